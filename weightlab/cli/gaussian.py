"""`weightlab gaussian`: how Gaussian the weights, and the fine-tuning update, are."""

from __future__ import annotations

from pathlib import Path

import typer

from weightlab.cli.app import Common, analysis_command, emit, progress
from weightlab.options import GaussianOptions


@analysis_command(precision=False)  # storage precision; moments accumulate in float64
def gaussian(
    checkpoint: Path = typer.Argument(..., help="Checkpoint to test (with --base: a fine-tune or adapter of BASE)."),
    base: Path | None = typer.Option(None, "--base", help="Also test ΔW = CHECKPOINT − BASE and its trend with depth."),
    options: GaussianOptions = None,
    common: Common = None,
) -> None:
    """Moments, normality tests and a shape label per tensor; with --base, the same for ΔW and its spread vs depth.

    Example: weightlab gaussian ft/ --base base/ --plots plots/
    """
    with common.outputs([checkpoint, base]) as plan:
        from weightlab.analysis.gaussian import gaussian as compute_gaussian
        from weightlab.io import open_finetuned, open_weights

        compute = common.compute()
        base_ckpt = open_weights(base) if base else None
        ckpt = open_finetuned(checkpoint, base_ckpt) if base_ckpt else open_weights(checkpoint)
        with progress("gaussian", "tensors") as (on_start, on_progress):
            result = compute_gaussian(ckpt, base_ckpt, options, compute, on_progress, on_start)
        emit(plan, result)
    common.show(result)
