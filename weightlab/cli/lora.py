"""`weightlab init-lora` and `weightlab extract-lora`: PEFT adapters from weights."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import typer

from weightlab.cli.app import Operation, console, operation_command, progress, refuse_unless
from weightlab.errors import InvalidArgument
from weightlab.options import LoraInitOptions, RankBudget

TargetsOpt = typer.Option("all-linear", "--targets", help="Module suffixes (q_proj,v_proj), a regex, or all-linear.")
AllocationOpt = typer.Option("energy", "--rank-allocation", help="How --rank-budget is shared: energy or entropy.")


@operation_command("init-lora")
def init_lora(
    base: Path | None = typer.Argument(None, help="Base checkpoint to initialise the LoRA from."),
    options: LoraInitOptions = None,
    tsd: bool = typer.Option(False, "--tsd", help="Short for --method tsd."),
    source: Path | None = typer.Option(None, "--from", help="tsd: fine-tuned checkpoint or warm-up adapter giving ΔW."),
    targets: str = TargetsOpt,
    rank_budget: int | None = typer.Option(
        None, "--rank-budget", help="Total rank over all targets instead of --rank, shared by their spectra (scale 1)."
    ),
    allocation: str = AllocationOpt,
    residual_out: Path | None = typer.Option(None, "--residual-out", help="Write the residual base model here."),
    no_residual: bool = typer.Option(
        False, "--no-residual", help="Write only the adapter (it then needs a residual you make)."
    ),
    as_plain_lora: Path | None = typer.Option(
        None,
        "--as-plain-lora",
        help="Convert this TRAINED adapter (with --initial) into a plain LoRA for the unmodified base.",
        metavar="TRAINED",
    ),
    initial: Path | None = typer.Option(None, "--initial", help="The adapter init-lora wrote before training."),
    common: Operation = None,
) -> None:
    """Initialise a LoRA from the base's singular directions (LoRA-Init from TSDs, PiSSA, MiLoRA).

    Example: weightlab init-lora base/ --tsd --from warmup/ -r 16 --targets q_proj,v_proj -o lora/ --residual-out res/
    """
    refuse_unless(
        as_plain_lora is None,
        "does not apply to --as-plain-lora (it converts a trained adapter as it is, computing nothing to report)",
        "base",
        "rank",
        "method",
        "tsd",
        "source",
        "targets",
        "alpha",
        "svd",
        "seed",
        "rank_budget",
        "allocation",
        "residual_out",
        "no_residual",
        "device",
        "threads",
        "ray",
        "ray_timeout",
        "json_out",
        "report",
    )
    refuse_unless(
        as_plain_lora is not None, "is the adapter --as-plain-lora converts: it needs --as-plain-lora", "initial"
    )
    refuse_unless(not no_residual, "and --no-residual contradict each other", "residual_out")
    refuse_unless(not tsd, "and --tsd both choose the method; use one", "method")
    refuse_unless(
        tsd or options.method == "tsd",
        "gives the warm-up update of --method tsd; the other methods use the base alone",
        "source",
    )
    refuse_unless(options.svd == "randomized", "seeds only --svd randomized (the exact SVD has no randomness)", "seed")
    refuse_unless(
        rank_budget is None, "does not apply with --rank-budget (each module's rank comes from the budget)", "rank"
    )
    refuse_unless(rank_budget is not None, "says how --rank-budget is shared: it needs --rank-budget", "allocation")
    if as_plain_lora is not None:
        if initial is None:
            raise InvalidArgument("--as-plain-lora needs --initial (the adapter as init-lora wrote it)")
        with common.outputs([as_plain_lora, initial, base]) as plan:
            from weightlab.io import LoraAdapter, open_checkpoint
            from weightlab.surgery.lora import to_plain_lora

            trained, start = open_checkpoint(as_plain_lora), open_checkpoint(initial)
            if not isinstance(trained, LoraAdapter) or not isinstance(start, LoraAdapter):
                raise InvalidArgument("--as-plain-lora and --initial take PEFT adapter folders", as_plain_lora)
            plain = to_plain_lora(trained, start)
            plain.write(plan.path("-o"), sidecar={"converted_from": str(as_plain_lora), "initial": str(initial)})
        rank = next(iter(plain.factors.values())).rank
        console.print(f"plain LoRA of rank {rank} for the unmodified base → {common.out}/")
        return
    if base is None:
        raise InvalidArgument("give the BASE checkpoint")
    options = replace(options, method="tsd") if tsd else options
    budget = RankBudget(rank_budget, allocation) if rank_budget is not None else None
    if residual_out is None and not no_residual:
        raise InvalidArgument(
            "this adapter only reproduces the model on the residual base: give --residual-out DIR, "
            "or --no-residual if you will build the residual yourself"
        )
    with common.outputs([base, source], residual_out_dir=residual_out) as plan:
        from weightlab.io import CheckpointWriter, open_finetuned, open_weights
        from weightlab.io.writer import stored_plan
        from weightlab.surgery.lora import init_lora as run_init
        from weightlab.surgery.targets import resolve_targets

        compute = common.compute()
        base_ckpt = open_weights(base)
        names = resolve_targets(base_ckpt, targets)
        ft = open_finetuned(source, base_ckpt) if source else None
        writer = (
            CheckpointWriter(
                plan.path("--residual-out"),
                donor=base_ckpt.path,
                plan=stored_plan(base_ckpt),
                metadata={"weightlab": f"residual of init-lora {options.method} r={options.rank}"},
            )
            if residual_out
            else None
        )
        with progress(f"init-lora ({options.method})", "modules") as (on_start, on_progress), writer or nullcontext():
            on_start(len(names))
            result, adapter = run_init(
                base_ckpt, names, options, ft, writer, compute, on_progress, budget, str(residual_out or base)
            )
        common.finish(plan, result, adapter)
    common.show(result, f"adapter → {common.out}/" + (f"; residual base → {residual_out}/" if residual_out else ""))


@operation_command("extract-lora")
def extract_lora(
    base: Path = typer.Argument(..., help="Base checkpoint."),
    finetuned: Path = typer.Argument(..., help="Fine-tuned checkpoint (or adapter) of BASE."),
    rank: int | None = typer.Option(None, "--rank", "-r", help="One rank for every module."),
    energy: float | None = typer.Option(
        None, "--energy", help="Per-module rank keeping this share of ‖ΔW‖² (e.g. 0.9)."
    ),
    rank_budget: int | None = typer.Option(
        None, "--rank-budget", help="Total rank over all targets, shared by the spectra of their ΔW."
    ),
    allocation: str = AllocationOpt,
    targets: str = TargetsOpt,
    common: Operation = None,
) -> None:
    """Approximate each ΔW = W_ft − W_base by its truncated SVD and write it as a PEFT LoRA adapter.

    Example: weightlab extract-lora base/ ft/ --energy 0.9 -o extracted/
    """
    refuse_unless(rank_budget is not None, "says how --rank-budget is shared: it needs --rank-budget", "allocation")
    with common.outputs([base, finetuned]) as plan:
        from weightlab.io import open_finetuned, open_weights
        from weightlab.surgery.lora import extract_lora as run_extract
        from weightlab.surgery.targets import resolve_targets

        compute = common.compute()
        base_ckpt = open_weights(base)
        ft = open_finetuned(finetuned, base_ckpt)
        names = resolve_targets(base_ckpt, targets)
        budget = RankBudget(rank_budget, allocation) if rank_budget is not None else None
        with progress("extract-lora", "modules") as (on_start, on_progress):
            on_start(len(names))
            result, adapter = run_extract(base_ckpt, ft, names, rank, energy, compute, on_progress, budget, str(base))
        common.finish(plan, result, adapter)
    common.show(result, f"adapter → {common.out}/")
