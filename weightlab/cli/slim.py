"""`weightlab slim-experts`: a Mixture-of-Experts model with fewer experts per block."""

from __future__ import annotations

from pathlib import Path

import typer

from weightlab.cli.app import Operation, operation_command
from weightlab.options import SlimExpertsOptions


@operation_command("slim-experts", local=True)
def slim_experts(
    model: Path = typer.Argument(..., help="An MoE checkpoint (file, folder or Hub ID)."),
    calibration: Path | None = typer.Option(
        None,
        "--calibration",
        help="Text to run the model on: prune by REAP saliency, or weigh merged experts by their routed share.",
    ),
    tokenizer: Path | None = typer.Option(
        None, "--tokenizer", help="Tokenizer folder for --calibration (default: the model's own)."
    ),
    options: SlimExpertsOptions = None,
    common: Operation = None,
) -> None:
    """Keep K experts per MoE block: merge groups of alike experts (HC-SMoE, from weights), or prune.

    Example: weightlab slim-experts qwen3-moe/ --experts 64 -o qwen3-moe-64/

    Router rows follow their experts and the config says K, so transformers loads the result as
    is. `weightlab experts` shows beforehand which experts are near copies.
    """
    from weightlab.api.operations import slim_experts as run_slim

    common.show(
        run_slim.core(
            model, out=common.out, calibration=calibration, tokenizer=tokenizer, options=options, run=common.run()
        )
    )
