"""Every command's options, declared once: default, domain, flag and help line.

The Python API builds these dataclasses (each checks its fields when built) and the command
line derives its options from them (`cli.app.options_parameters`), so both refuse the same values
with the same message and `--help` says what the docstrings say. This module imports no
numerical library: the command line reads it before it knows it has work to do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

from weightlab.domains import REGEX, SEED, Choice, Int, Real, check_fields, option
from weightlab.errors import InvalidArgument
from weightlab.typecheck import check, hints_of

SVD_METHODS = ("exact", "randomized")
SIDES = ("left", "right", "both")
INIT_METHODS = ("tsd", "pissa", "milora")
RANK_RULES = ("energy", "entropy")
NORM_OF = ("weights", "task-vectors")
GRANULARITY = ("tensor", "model")
NORMALIZE = ("sum", "count")
DEVICES_HELP = "auto (a GPU when there is one), cpu, or cuda[:N]."
MIN_SAMPLE = 20  # the smallest sample D'Agostino–Pearson's K² accepts
DEFAULT_CACHE_GIB = 4.0


class Checked:
    """Options are checked against their declarations when built: each field's type (its
    annotation), then its domain."""

    def __post_init__(self) -> None:
        hints = hints_of(type(self))
        for f in fields(self):  # type: ignore[arg-type]  # every subclass is a dataclass
            if "domain" not in f.metadata:  # a domain checks the type itself
                check(f.metadata["flag"], getattr(self, f.name), hints[f.name])
        check_fields(self)


@dataclass(frozen=True)
class Filters(Checked):
    """`--include` / `--exclude` regexes on tensor names; a base of every analysis's options
    (keyword-only, so they follow each analysis's own options)."""

    include: str | None = option(
        None, REGEX, "--include", help="Only tensors whose name matches this regex.", kw_only=True
    )
    exclude: str | None = option(
        None, REGEX, "--exclude", help="Skip tensors whose name matches this regex.", kw_only=True
    )


@dataclass(frozen=True)
class SpectrumOptions(Filters):
    k: int = option(8, Int(1), "-k", "--top-k", help="Top singular values/vectors for amplification and reorientation.")
    intruder_k: int = option(10, Int(1), "--intruder-k", help="Top fine-tuned singular vectors checked for intruders.")
    epsilon: float = option(
        0.5, Real(0, 1), "--epsilon", help="Intruder threshold on max |cos| with any base singular vector."
    )
    keep: int | None = option(
        None, Int(1, optional=True), "--keep", help="Singular values kept per matrix in --json [default: all]."
    )
    values_only: bool = option(
        False,
        None,
        "--values-only",
        help="Singular values alone (norms, ranks, amplification): no vectors, much faster.",
    )


@dataclass(frozen=True)
class CacheOptions(Checked):
    """Where `spectrum` keeps base decompositions between runs (`compute.cache`)."""

    cache_dir: Path | None = option(
        None,
        None,
        "--cache-dir",
        help="Where base decompositions are kept between runs "
        "[default: $WEIGHTLAB_CACHE or ~/.cache/weightlab/decompositions].",
    )
    cache_size: float = option(DEFAULT_CACHE_GIB, Real(0), "--cache-size", help="Bound of the cache folder in GiB.")
    no_cache: bool = option(False, None, "--no-cache", help="Neither read nor write the decomposition cache.")

    @property
    def folder(self) -> Path | None:
        """The cache folder: --cache-dir, else $WEIGHTLAB_CACHE, else $XDG_CACHE_HOME/weightlab/
        decompositions, else ~/.cache/…; None with --no-cache."""
        if self.no_cache:
            return None
        if self.cache_dir is not None:
            return Path(self.cache_dir).expanduser()
        if os.environ.get("WEIGHTLAB_CACHE"):
            return Path(os.environ["WEIGHTLAB_CACHE"])
        return user_cache() / "decompositions"


@dataclass(frozen=True)
class ESDOptions(Filters):
    traps: bool = option(
        True,
        None,
        "--traps/--no-traps",
        help="Look for correlation traps in a seeded shuffle of each matrix (twice the work).",
    )
    seed: int = option(0, SEED, "--seed", help="Seed of the shuffles.")
    min_evals: int = option(10, Int(3), "--min-evals", help="Fewest non-zero eigenvalues a power-law fit is tried on.")


@dataclass(frozen=True)
class QuantErrorOptions(Filters):
    k: int = option(8, Int(1), "-k", "--top-k", help="Top singular values/vectors checked for survival.")
    min_evals: int = option(10, Int(3), "--min-evals", help="Fewest non-zero eigenvalues a power-law fit is tried on.")


@dataclass(frozen=True)
class ExpertsOptions(Filters):
    k: int = option(
        8, Int(1), "-k", "--top-k", help="Top singular directions of each expert compared (subspace overlap)."
    )
    near_copy: float = option(
        0.9,
        Real(0, 1, low_open=True),
        "--near-copy",
        help="Experts whose weights' mean cosine to each other reaches this are near copies.",
    )


SLIM_WAYS = ("merge", "prune")


@dataclass(frozen=True)
class SlimExpertsOptions(Checked):
    experts: int | None = option(
        None, Int(1, optional=True), "--experts", help="Experts each MoE block keeps (required; at least top-k)."
    )
    by: str = option(
        "merge",
        Choice(*SLIM_WAYS),
        "--by",
        help="merge: each group of alike experts becomes their mean; prune: the experts most like another go.",
    )


@dataclass(frozen=True)
class CompareOptions(Filters):
    k: int = option(8, Int(1), "-k", "--top-k", help="Dimension of each ΔW's top singular subspace.")
    density: float = option(
        0.2, Real(0, 1, low_open=True), "--density", help="Share of entries TIES would keep, for the sign conflict."
    )


@dataclass(frozen=True)
class AnglesOptions(Filters):
    k: int = option(16, Int(1), "-k", "--top-k", help="Dimension of the top singular subspaces.")
    side: str = option("left", Choice(*SIDES), "--side", help="left (column space), right (row space) or both.")
    svd: str = option("exact", Choice(*SVD_METHODS), "--svd", help="exact, or randomized (seeded) for k ≪ min(m, n).")
    seed: int = option(0, SEED, "--seed", help="Seed of the randomized SVD.")


@dataclass(frozen=True)
class GaussianOptions(Filters):
    min_elements: int = option(4096, Int(1), "--min-elements", help="Skip tensors with fewer entries.")
    sample_size: int = option(
        100_000, Int(MIN_SAMPLE), "--sample-size", help="Entries sampled (seeded) for KS, AD, K² and Q-Q."
    )
    seed: int = option(0, SEED, "--seed", help="Seed of the sample.")


@dataclass(frozen=True)
class TSDOptions(Filters):
    top: int = option(8, Int(1), "--top", help="Task-specific directions kept per matrix.")
    keep: int | None = option(
        None, Int(1, optional=True), "--keep", help="Change rates kept per matrix in --json [default: all]."
    )


@dataclass(frozen=True)
class IntruderOptions(Filters):
    top_k: int = option(10, Int(1), "--intruder-k", help="Top singular vectors of the fine-tune examined per matrix.")
    epsilon: float = option(
        0.5, Real(0, 1), "--epsilon", help="An intruder's best |cos| with any base singular vector is below this."
    )
    scale: float = option(
        0.75, Real(0, 1), "--lambda", help="Multiply each intruder's singular value by this (0 removes it)."
    )


@dataclass(frozen=True)
class LoraInitOptions(Checked):
    method: str = option("pissa", Choice(*INIT_METHODS), "--method", help="tsd, pissa (top-r) or milora (bottom-r).")
    rank: int = option(8, Int(1), "--rank", "-r", help="LoRA rank r.")
    alpha: float | None = option(
        None, Real(0, low_open=True, optional=True), "--alpha", help="lora_alpha [default: r, scale 1]."
    )
    svd: str = option("exact", Choice(*SVD_METHODS), "--svd", help="exact, or randomized (seeded; pissa only).")
    seed: int = option(0, SEED, "--seed", help="Seed of the randomized SVD.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.svd == "randomized" and self.method != "pissa":
            raise InvalidArgument(f"--svd randomized finds top directions only; {self.method} needs the full spectrum")

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank


@dataclass(frozen=True)
class RankBudget(Checked):
    """A total rank over all targeted modules, shared by their spectra (`surgery.rank_budget`)."""

    total: int = option(64, Int(1), "--rank-budget", help="Total rank over all targets, shared by their spectra.")
    rule: str = option(
        "energy", Choice(*RANK_RULES), "--rank-allocation", help="How --rank-budget is shared: energy or entropy."
    )


@dataclass(frozen=True)
class NanOptions(Checked):
    norm_of: str = option("weights", Choice(*NORM_OF), "--nan-norm-of", help="NAN norms: weights or task-vectors.")
    granularity: str = option("tensor", Choice(*GRANULARITY), "--nan-granularity", help="NAN per tensor or model.")
    power: float = option(
        1.0,
        Real(0, 16, low_open=True),
        "--nan-power",  # beyond 16, ‖·‖^(−p) under/overflows
        help="NAN c_i ∝ ‖·‖^(−power).",
    )
    normalize: str = option("sum", Choice(*NORMALIZE), "--nan-normalize", help="NAN Σc_i = 1 (sum) or N (count).")


# The options of how any command runs and what it writes besides its result, declared once:
# (flags, help). The Python API takes them as keywords (`api.frame.Run`), the command line as
# the shared options of every analysis and operation (`cli.app.SHARED_OPTIONS`).
RUN_OPTIONS: dict[str, tuple[tuple[str, ...], str]] = {
    "device": (("--device",), DEVICES_HELP),
    "dtype": (("--dtype",), "Precision of the maths: float32 or float64."),
    "threads": (("--threads",), "Threads of the maths [default: the CPUs this process may use]."),
    "ray": (
        ("--ray",),
        "Run on a Ray cluster: its address, or auto ($RAY_ADDRESS, else a local cluster); "
        "every node must see the input paths. Needs weightlab[ray].",
    ),
    "ray_timeout": (("--ray-timeout",), "With --ray: give up connecting after this long [default: 15]."),
    "json": (("--json",), "Write the result (for a model: the record of what was done) as JSON ('-' for stdout)."),
    "csv": (("--csv",), "Write one row per tensor as CSV ('-' for stdout)."),
    "plots": (("--plots",), "Write PNG plots into this folder."),
    "report": (("--report",), "Also write a self-contained HTML report."),
    "force": (("--force",), "Overwrite existing outputs."),
    "out": (("-o", "--out"), "Folder to write the model (or adapter) into."),
}


def user_cache() -> Path:
    """weightlab's folder in the user's cache: $XDG_CACHE_HOME/weightlab, else ~/.cache/weightlab
    (an empty $XDG_CACHE_HOME counts as unset, as the XDG specification says)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "weightlab"
