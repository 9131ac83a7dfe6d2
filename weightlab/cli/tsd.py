"""`weightlab tsd`: task-specific directions, the base singular directions a fine-tune moved most."""

from __future__ import annotations

from pathlib import Path

import typer

from weightlab.cli.app import Common, analysis_command, emit, progress
from weightlab.options import TSDOptions


@analysis_command()
def tsd(
    base: Path = typer.Argument(..., help="Base checkpoint."),
    finetuned: Path = typer.Argument(..., help="Fine-tuned checkpoint or PEFT adapter (e.g. a short warm-up run)."),
    save: Path | None = typer.Option(
        None, "--save", help="Store indices, u, v, σ, δ per matrix (.safetensors) for init-lora.", metavar="FILE"
    ),
    options: TSDOptions = None,
    common: Common = None,
) -> None:
    """Task-specific directions: base singular directions with the largest change rate |u_iᵀΔWv_i|/σ_i.

    Example: weightlab tsd base/ warmup-adapter/ --top 8 --save tsd.safetensors
    """
    with common.outputs([base, finetuned], save=save) as plan:
        from weightlab.analysis.tsd import save_directions
        from weightlab.analysis.tsd import tsd as compute_tsd
        from weightlab.io import open_finetuned, open_weights

        compute = common.compute()
        base_ckpt = open_weights(base)
        ft = open_finetuned(finetuned, base_ckpt)
        with progress("tsd") as (on_start, on_progress):
            result, vectors = compute_tsd(
                base_ckpt, ft, options, compute, on_progress, on_start, keep_vectors=save is not None
            )
        if save:
            save_directions(
                plan.path("--save"), vectors, {"base": str(base), "finetuned": str(finetuned), "top": str(options.top)}
            )
        emit(plan, result)
    common.show(result)
