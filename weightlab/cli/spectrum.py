"""`weightlab spectrum`: how fine-tuning moved each weight matrix's singular values and vectors."""

from __future__ import annotations

from pathlib import Path

import typer

from weightlab.cli.app import Common, analysis_command
from weightlab.options import CacheOptions, SpectrumOptions


@analysis_command()
def spectrum(
    base: Path = typer.Argument(..., help="Base checkpoint (file or folder)."),
    finetuned: list[Path] | None = typer.Argument(
        None, help="Fine-tuned checkpoints or PEFT adapters of BASE (none with --values-only: BASE's own spectra)."
    ),
    options: SpectrumOptions = None,
    cache: CacheOptions = None,
    common: Common = None,
) -> None:
    """Per-matrix SVD of base vs fine-tuned: amplification, norms and ranks, reorientation, intruders.

    Example: weightlab spectrum base/ ft/ --plots plots/ --json spectrum.json

    The base's decompositions are cached by content, so more fine-tunes of the same base (or a
    re-run) skip them. --values-only BASE alone gives the base's own spectra.
    """
    from weightlab.api.analyses import spectrum as run_spectrum

    common.show(run_spectrum.core(base, finetuned or [], options=options, cache=cache, run=common.run()))
