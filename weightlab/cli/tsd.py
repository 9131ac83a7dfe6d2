"""`weightlab tsd`: task-specific directions, the base singular directions a fine-tune moved most."""

from __future__ import annotations

from pathlib import Path

import typer

from weightlab.cli.app import Common, analysis_command
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
    from weightlab.api.analyses import tsd as run_tsd

    common.show(run_tsd.core(base, finetuned, save, options=options, run=common.run()))
