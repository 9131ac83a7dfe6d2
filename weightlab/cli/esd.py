"""`weightlab esd`: heavy-tailed spectral densities of every weight matrix, WeightWatcher's way."""

from __future__ import annotations

from pathlib import Path

import typer

from weightlab.cli.app import Common, analysis_command, emit, progress, refuse_unless
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
    refuse_unless(options.traps, "does not apply with --no-traps (it seeds the shuffles that look for traps)", "seed")
    with common.outputs([checkpoint, base]) as plan:
        from weightlab.analysis.esd import esd as compute_esd
        from weightlab.io import open_finetuned, open_weights

        compute = common.compute()
        base_ckpt = open_weights(base) if base else None
        ckpt = open_finetuned(checkpoint, base_ckpt) if base_ckpt else open_weights(checkpoint)
        with progress("esd") as (on_start, on_progress):
            result = compute_esd(ckpt, base_ckpt, options, compute, on_progress, on_start)
        emit(plan, result)
    common.show(result)
