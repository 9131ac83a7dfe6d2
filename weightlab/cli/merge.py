"""`weightlab merge`: streaming model merging with manual or NAN coefficients."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import typer
from typer.core import TyperCommand

from weightlab.cli.app import Operation, operation_command, progress, refuse_unless
from weightlab.errors import InvalidArgument
from weightlab.options import NanOptions


def _methods_help() -> str:
    """The registry, one line per method, for the bottom of `merge --help`."""
    from weightlab.merge import METHODS
    from weightlab.merge.modifiers import MODIFIERS

    lines = ["Methods (parameters: --lambda, --density, or --param NAME=VALUE):"]
    for m in [*METHODS.values(), *MODIFIERS.values()]:
        params = ", ".join(f"{p.name}={p.default:g}" for p in m.params) or "no parameters"
        kind = "--" + m.name + " (after any method)" if m.name in MODIFIERS else m.name
        base = "" if getattr(m, "needs_base", True) else "; no base"
        lines.append(f"{kind}: {params}{base}. {m.reference.replace('*', '')}")
    return "\n\n".join(lines)


def _params(texts: list[str] | None) -> dict[str, float]:
    """{name: value} from `--param NAME=VALUE` options."""
    out: dict[str, float] = {}
    for text in texts or []:
        name, sep, value = text.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            out[name.strip()] = int(value) if value.strip().lstrip("+-").isdigit() else float(value)
        except ValueError:
            raise InvalidArgument(
                f"--param {text!r}: write NAME=VALUE with a number, e.g. --param gamma=0.05"
            ) from None
    return out


def _floats(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InvalidArgument(f"--weights {text!r}: give comma-separated numbers, e.g. 0.5,0.3,0.2") from None


class _MergeCommand(TyperCommand):
    """`merge`, whose epilog (the method registry) is read only when --help shows it."""

    @property
    def epilog(self) -> str:
        return _methods_help()

    @epilog.setter
    def epilog(self, value: object) -> None:
        pass


@operation_command("merge", cls=_MergeCommand)
def merge(
    models: list[str] = typer.Argument(None, help="Fine-tuned checkpoints to merge (or give them in --config)."),
    method: str | None = typer.Option(None, "--method", help="One of the methods listed below."),
    base: str | None = typer.Option(None, "--base", help="Base checkpoint (task vectors τ_i = θ_i − θ_base)."),
    weights: str | None = typer.Option(None, "--weights", help="Comma-separated coefficient per model."),
    coeff: str | None = typer.Option(None, "--coeff", help="manual (--weights, default 1 each) or nan."),
    nan_norm_of: str | None = typer.Option(None, "--nan-norm-of", help="NAN norms: weights (default) or task-vectors."),
    nan_granularity: str | None = typer.Option(None, "--nan-granularity", help="NAN per tensor (default) or model."),
    nan_power: float | None = typer.Option(None, "--nan-power", help="NAN c_i ∝ ‖·‖^(−power) (default 1)."),
    nan_normalize: str | None = typer.Option(None, "--nan-normalize", help="NAN Σc_i = 1 (sum, default) or N (count)."),
    lam: float | None = typer.Option(None, "--lambda", help="Scale of the merged task vector (default 1)."),
    density: float | None = typer.Option(None, "--density", help="Fraction of entries kept (TIES/DARE/breadcrumbs)."),
    param: list[str] | None = typer.Option(
        None, "--param", metavar="NAME=VALUE", help="Any other parameter of the method (repeatable); listed below."
    ),
    svc: bool = typer.Option(
        False, "--svc", help="Then recalibrate each matrix's singular values (SVC; --param svc_alpha)."
    ),
    lines: bool = typer.Option(
        False, "--lines", help="Then scale each layer's update by depth (LiNeS; --param lines_beta)."
    ),
    gamma: float | None = typer.Option(None, "--gamma", hidden=True),  # = --param gamma=…, kept for old scripts
    epsilon: float | None = typer.Option(None, "--epsilon", hidden=True),
    t: float | None = typer.Option(None, "--t", hidden=True),
    seed: int | None = typer.Option(None, "--seed", help="Seed of DARE's random drops (default 0; DARE methods only)."),
    dtype: str | None = typer.Option(None, "--dtype", help="Output dtype (default: the base's)."),
    config: Path | None = typer.Option(None, "--config", help="YAML with all of the above (ours or mergekit's)."),
    donor: Path | None = typer.Option(None, "--donor", help="Copy config/tokenizer from here (default: the base)."),
    shard_size: str | None = typer.Option(None, "--shard-size", help="Largest output shard [default: 5GB]."),
    as_adapter: bool = typer.Option(
        False,
        "--as-adapter",
        help="The models are LoRA adapters: write a LoRA adapter "
        "(task-arithmetic, average: exact; ties, tsv: in their joint low-rank space).",
    ),
    max_rank: int | None = typer.Option(
        None, "--max-rank", help="With --as-adapter: keep each module's best rank-k update."
    ),
    common: Operation = None,
) -> None:
    """Merge fine-tunes of one base, streaming tensor by tensor, with manual or NAN coefficients.

    Example: weightlab merge --method ties --coeff nan --base base/ ft_a/ ft_b/ ft_c/ --density 0.3 -o merged/
    """
    from weightlab.merge.config import build_config, load_config

    options = load_config(config) if config else {}
    flags = {"lambda": lam, "density": density, "gamma": gamma, "epsilon": epsilon, "t": t}
    given = {**{k: v for k, v in flags.items() if v is not None}, **_params(param)}
    options["param_values"] = {**options.get("param_values", {}), **given}
    overrides = {
        "method": method,
        "base": base,
        "weights": _floats(weights),
        "coeff": coeff,
        "seed": seed,
        "dtype": dtype,
        "shard_size": shard_size,
        "donor": None if donor is None else str(donor),
        "max_rank": max_rank,
        "as_adapter": as_adapter or None,
    }
    options.update({k: v for k, v in overrides.items() if v is not None})
    if models:
        options["models"] = list(models)
    flagged = [name for name, on in (("svc", svc), ("lines", lines)) if on]
    options["modifiers"] = [
        *options.get("modifiers", []),
        *(m for m in flagged if m not in options.get("modifiers", [])),
    ]
    nan_given = {
        k: v
        for k, v in {
            "norm_of": nan_norm_of,
            "granularity": nan_granularity,
            "power": nan_power,
            "normalize": nan_normalize,
        }.items()
        if v is not None
    }
    if nan_given:
        options["nan"] = replace(options.get("nan", NanOptions()), **nan_given)
    if "method" not in options or not options.get("models"):
        raise InvalidArgument("give --method and the models to merge (on the command line or in --config)")
    cfg = build_config(options)
    if nan_given and cfg.coeff != "nan":
        raise InvalidArgument("--nan-* options need --coeff nan (or --method nan)")
    refuse_unless(cfg.spec.random, f"seeds random drops; {cfg.method} draws nothing at random", "seed")
    refuse_unless(
        not cfg.as_adapter,
        "does not apply to --as-adapter (the adapters' small factors are merged on this machine's CPU in float64)",
        "device",
        "ray",
        "ray_timeout",
        "threads",
    )
    with common.outputs([cfg.base, *cfg.models, config, cfg.donor]) as plan:
        from weightlab.merge import merge as run_merge
        from weightlab.merge.adapters import merge_as_adapter

        if cfg.as_adapter:  # LoRA adapters of one base in, one LoRA adapter out
            report = merge_as_adapter(cfg, plan.path("-o"))
        else:
            compute = common.compute()
            with progress(f"merge ({cfg.method})", "tensors") as (on_start, on_progress):
                report = run_merge(cfg, plan.path("-o"), compute=compute, on_progress=on_progress, on_start=on_start)
        report.out = str(common.out)  # it was written to a staging path; this is where it lands
        common.finish(plan, report)
    common.show(report)
