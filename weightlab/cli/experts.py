"""`weightlab experts`: a Mixture-of-Experts model's experts compared, block by block."""

from __future__ import annotations

from pathlib import Path

import typer

from weightlab.cli.app import Common, analysis_command
from weightlab.options import ExpertsOptions


@analysis_command(precision=False, ray=False)  # float64 sums; one block at a time, here
def experts(
    checkpoint: Path = typer.Argument(
        ..., help="An MoE checkpoint (file, folder or Hub ID; with --base: a fine-tune or adapter of BASE)."
    ),
    base: Path | None = typer.Option(None, "--base", help="The MoE it was fine-tuned from: how far each expert moved."),
    calibration: Path | None = typer.Option(
        None,
        "--calibration",
        help="Text to run the model on (one text per line, or JSONL): each expert's routed share and REAP saliency.",
    ),
    tokenizer: Path | None = typer.Option(
        None, "--tokenizer", help="Tokenizer folder for --calibration (default: the checkpoint's own)."
    ),
    options: ExpertsOptions = None,
    common: Common = None,
) -> None:
    """Experts per MoE block: cosine and subspace overlap, near copies, router rows, what moved.

    Example: weightlab experts qwen3-moe-ft/ --base qwen3-moe/ --report experts.html

    Fused expert tensors (transformers' experts.gate_up_proj) and per-expert ones (Mixtral's
    w1/w2/w3) give the same experts; one part of one block's experts is in memory at a time.
    """
    from weightlab.api.analyses import experts as run_experts

    common.show(run_experts.core(checkpoint, base, calibration, tokenizer, options=options, run=common.run()))
