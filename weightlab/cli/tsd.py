"""`weightlab tsd`: task-specific directions, the base singular directions a fine-tune moved most."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from weightlab.analysis.tsd import TSDOptions, save_directions, tsd as compute_tsd
from weightlab.cli.app import Common, analysis_command, emit, progress
from weightlab.io import open_finetuned, open_weights


@analysis_command()
def tsd(
    base: Path = typer.Argument(..., help="Base checkpoint."),
    finetuned: Path = typer.Argument(..., help="Fine-tuned checkpoint or PEFT adapter (e.g. a short warm-up run)."),
    top: int = typer.Option(8, "--top", help="Task-specific directions kept per matrix."),
    keep: Optional[int] = typer.Option(None, "--keep", help="Change rates kept per matrix in --json (default all)."),
    save: Optional[Path] = typer.Option(None, "--save", help="Store indices, u, v, σ, δ per matrix (.safetensors) for init-lora.",
                                        metavar="FILE"),
    common: Common = None,
) -> None:
    """Task-specific directions: base singular directions with the largest change rate |u_iᵀΔWv_i|/σ_i.

    Example: weightlab tsd base/ warmup-adapter/ --top 8 --save tsd.safetensors
    """
    options = TSDOptions(top, keep, **common.filters)
    compute = common.compute()
    with common.outputs([base, finetuned], save=save) as plan:
        base_ckpt = open_weights(base)
        ft = open_finetuned(finetuned, base_ckpt)
        with progress("tsd") as (on_start, on_progress):
            result, vectors = compute_tsd(base_ckpt, ft, options, compute, on_progress, on_start,
                                          keep_vectors=save is not None)
        if save:
            save_directions(plan.path("--save"), vectors, {"base": str(base), "finetuned": str(finetuned), "top": str(top)})
        emit(plan, result)
    common.show(result)
