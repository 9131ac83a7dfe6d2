"""`weightlab merge`: streaming model merging with manual or NAN coefficients."""

from __future__ import annotations

from pathlib import Path

import typer
from typer.core import TyperCommand

from weightlab.cli.app import Operation, operation_command
from weightlab.errors import InvalidArgument
from weightlab.options import NanOptions


def _methods_help() -> str:
    """The registry, one line per method, for the bottom of `merge --help`."""
    from weightlab.merging import METHODS
    from weightlab.merging.modifiers import MODIFIERS

    lines = ["Methods (parameters: --lambda, --density, or --param NAME=VALUE):"]
    for m in [*METHODS.values(), *MODIFIERS.values()]:
        params = ", ".join(f"{p.name}={p.shown_default}" for p in m.params) or "no parameters"
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


def _lambda(text: str | float | None) -> float | str | None:
    """--lambda: a number, or auto."""
    if text is None or text == "auto" or isinstance(text, float):
        return text
    try:
        return float(text)
    except ValueError:
        raise InvalidArgument(f"--lambda {text!r}: give a number, or auto") from None


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
    nan: NanOptions = None,
    lam: str | None = typer.Option(
        None,
        "--lambda",
        help="Scale of the merged task vector (default 1), or auto: chosen per tensor from the task vectors.",
    ),
    density: float | None = typer.Option(None, "--density", help="Fraction of entries kept (TIES/DARE/breadcrumbs)."),
    param: list[str] | None = typer.Option(
        None, "--param", metavar="NAME=VALUE", help="Any other parameter of the method (repeatable); listed below."
    ),
    calibration: list[Path] | None = typer.Option(
        None,
        "--calibration",
        metavar="FILE",
        help='Unlabeled text for regmean, regmean++, fisher: one text per line or a .jsonl of {"text": ...}; '
        "once for all models or once per model.",
    ),
    tokenizer: Path | None = typer.Option(
        None, "--tokenizer", help="Tokenizer folder for --calibration (default: the first input that has one)."
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
        "(task-arithmetic, average: exact; ties, tsv: in their joint low-rank space; every other method of "
        "task vectors in the adapters' core space).",
    ),
    max_rank: int | None = typer.Option(
        None, "--max-rank", help="With --as-adapter: keep each module's best rank-k update."
    ),
    match_experts: bool = typer.Option(
        False,
        "--match-experts",
        help="Mixture-of-Experts models: match each model's experts to the base's (or the first model's) by the "
        "cosine of their weights (Hungarian, per MoE block) and merge matched experts, router rows reordered too.",
    ),
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="Compute and write nothing: print the plan (tensors, GB to read and write, estimated peak memory, "
        "free disk).",
    ),
    common: Operation = None,
) -> None:
    """Merge fine-tunes of one base, streaming tensor by tensor, with manual or NAN coefficients.

    Example: weightlab merge --method ties --coeff nan --base base/ ft_a/ ft_b/ ft_c/ --density 0.3 -o merged/
    """
    from weightlab.api.operations import merge as run_merge

    hidden = {k: v for k, v in {"gamma": gamma, "epsilon": epsilon, "t": t}.items() if v is not None}
    params = {**hidden, **_params(param)}  # --param wins over the flag of the same parameter
    lam, density = params.pop("lambda", lam), params.pop("density", density)
    report = run_merge.core(
        base,
        models or None,
        method=method,
        weights=_floats(weights),
        coeff=coeff,
        lam=_lambda(lam),
        density=density,
        calibration=calibration or None,
        tokenizer=tokenizer,
        svc=svc,
        lines=lines,
        seed=seed,
        dtype=dtype,
        config=config,
        donor=donor,
        shard_size=shard_size,
        as_adapter=as_adapter,
        max_rank=max_rank,
        match_experts=match_experts,
        dry_run=dry_run,
        out=common.out,
        nan=nan,
        run=common.run(),
        params=params,
    )
    common.show(report)
