"""`weightlab esd`: heavy-tailed spectral densities of every weight matrix, WeightWatcher's way."""

from __future__ import annotations

from pathlib import Path

import typer

from weightlab.cli.app import Common, analysis_command
from weightlab.options import ESDOptions


@analysis_command()
def esd(
    checkpoint: Path = typer.Argument(
        ..., help="Checkpoint (file, folder or Hub ID; with --base: a fine-tune or adapter of BASE)."
    ),
    base: Path | None = typer.Option(None, "--base", help="Also the spectral density of ΔW = CHECKPOINT − BASE."),
    options: ESDOptions = None,
    common: Common = None,
) -> None:
    """Power-law α (x_min by KS distance), α̂, norms, stable rank, Marchenko–Pastur spikes and correlation traps.

    Example: weightlab esd model/ --plots plots/ --json esd.json

    Every matrix is analysed whole, embeddings and heads included; what cannot be is listed with
    the reason. Eigenvalues come from float64 Gram matrices; --dtype sets the precision of ΔW.
    """
    from weightlab.api.analyses import esd as run_esd

    common.show(run_esd.core(checkpoint, base, options=options, run=common.run()))
