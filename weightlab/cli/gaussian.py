"""`weightlab gaussian`: how Gaussian the weights, and the fine-tuning update, are."""

from __future__ import annotations

from pathlib import Path

import typer

from weightlab.cli.app import Common, analysis_command
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
    from weightlab.api.analyses import gaussian as run_gaussian

    common.show(run_gaussian.core(checkpoint, base, options=options, run=common.run()))
