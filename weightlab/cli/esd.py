"""`weightlab esd`: heavy-tailed spectral density metrics per weight matrix (WeightWatcher's and more)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from weightlab.analysis.esd import ESDOptions, esd as compute_esd
from weightlab.cli.app import Common, analysis_command, emit, progress, refuse_unless
from weightlab.io import open_finetuned, open_weights


@analysis_command()
def esd(
    checkpoint: Path = typer.Argument(..., help="Checkpoint (file, folder or Hub ID; with --base: a fine-tune or adapter of BASE)."),
    base: Optional[Path] = typer.Option(None, "--base", help="Also the spectral density of ΔW = CHECKPOINT − BASE."),
    traps: bool = typer.Option(True, "--traps/--no-traps",
                               help="Look for correlation traps in a seeded shuffle of each matrix (twice the work)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the shuffles."),
    min_evals: int = typer.Option(10, "--min-evals", help="Fewest non-zero eigenvalues a power-law fit is tried on."),
    common: Common = None,
) -> None:
    """Power-law α (x_min by KS distance), α̂, norms, stable rank, Marchenko–Pastur spikes and correlation traps.

    Example: weightlab esd model/ --plots plots/ --json esd.json

    Every matrix is analysed whole, embeddings and heads included; what cannot be is listed with
    the reason. Eigenvalues come from float64 Gram matrices; --dtype sets the precision of ΔW.
    """
    refuse_unless(traps, "does not apply with --no-traps (it seeds the shuffles that look for traps)", "seed")
    options = ESDOptions(traps, seed, min_evals, **common.filters)
    compute = common.compute()
    with common.outputs([checkpoint, base]) as plan:
        base_ckpt = open_weights(base) if base else None
        ckpt = open_finetuned(checkpoint, base_ckpt) if base_ckpt else open_weights(checkpoint)
        with progress("esd") as (on_start, on_progress):
            result = compute_esd(ckpt, base_ckpt, options, compute, on_progress, on_start)
        emit(plan, result)
    common.show(result)
