"""`weightlab init-lora` and `weightlab extract-lora`: PEFT adapters from weights."""

from __future__ import annotations

from pathlib import Path

import typer

from weightlab.cli.app import Operation, console, operation_command
from weightlab.options import LoraInitOptions

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
    rank_allocation: str = AllocationOpt,
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
    from weightlab.api.operations import init_lora as run_init

    made = run_init.core(
        base,
        tsd=tsd,
        source=source,
        targets=targets,
        rank_budget=rank_budget,
        rank_allocation=rank_allocation,
        out=common.out,
        residual_out=residual_out,
        no_residual=no_residual,
        as_plain_lora=as_plain_lora,
        initial=initial,
        options=options,
        run=common.run(),
    )
    if as_plain_lora is not None:
        rank = next(iter(made.factors.values())).rank
        console.print(f"plain LoRA of rank {rank} for the unmodified base → {common.out}/")
        return
    common.show(made, f"adapter → {common.out}/" + (f"; residual base → {residual_out}/" if residual_out else ""))


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
    rank_allocation: str = AllocationOpt,
    targets: str = TargetsOpt,
    common: Operation = None,
) -> None:
    """Approximate each ΔW = W_ft − W_base by its truncated SVD and write it as a PEFT LoRA adapter.

    Example: weightlab extract-lora base/ ft/ --energy 0.9 -o extracted/
    """
    from weightlab.api.operations import extract_lora as run_extract

    result = run_extract.core(
        base,
        finetuned,
        rank=rank,
        energy=energy,
        rank_budget=rank_budget,
        rank_allocation=rank_allocation,
        targets=targets,
        out=common.out,
        run=common.run(),
    )
    common.show(result, f"adapter → {common.out}/")
