"""`weightlab spectrum`: how fine-tuning moved each weight matrix's singular values and vectors."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from weightlab.analysis.spectrum import SpectrumOptions, spectrum as compute_spectrum
from weightlab.cli.app import Common, analysis_command, emit, progress
from weightlab.io import open_finetuned, open_weights


@analysis_command()
def spectrum(
    base: Path = typer.Argument(..., help="Base checkpoint (file or folder)."),
    finetuned: List[Path] = typer.Argument(..., help="Fine-tuned checkpoints or PEFT adapters of BASE."),
    k: int = typer.Option(8, "-k", "--top-k", help="Top singular values/vectors for amplification and reorientation."),
    intruder_k: int = typer.Option(10, "--intruder-k", help="Top fine-tuned singular vectors checked for intruders."),
    epsilon: float = typer.Option(0.5, "--epsilon", help="Intruder threshold on max |cos| with any base singular vector."),
    keep: Optional[int] = typer.Option(None, "--keep", help="Singular values kept per matrix in --json (default all)."),
    common: Common = None,
) -> None:
    """Per-matrix SVD of base vs fine-tuned: amplification, norms and ranks, reorientation, intruders.

    Example: weightlab spectrum base/ ft/ --plots plots/ --json spectrum.json
    """
    options = SpectrumOptions(k, intruder_k, epsilon, keep, **common.filters)
    compute = common.compute()
    with common.outputs([base, *finetuned]) as plan:
        base_ckpt = open_weights(base)
        fts = [open_finetuned(p, base_ckpt) for p in finetuned]
        with progress("spectrum") as (on_start, on_progress):
            result = compute_spectrum(base_ckpt, fts, options, compute, on_progress, on_start)
        emit(plan, result)
    common.show(result)
