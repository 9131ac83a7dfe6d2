"""`weightlab spectrum`: how fine-tuning moved each weight matrix's singular values and vectors."""

from __future__ import annotations

from pathlib import Path

import typer

from weightlab.cli.app import Common, analysis_command, emit, progress, refuse_unless
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
    finetuned = finetuned or []
    refuse_unless(
        not cache.no_cache and not options.values_only,
        "does not apply: nothing is cached with --no-cache or --values-only",
        "cache_dir",
        "cache_size",
    )
    refuse_unless(
        not options.values_only,
        "does not apply to --values-only (no singular vectors, so no intruders)",
        "intruder_k",
        "epsilon",
    )
    refuse_unless(bool(finetuned), "does not apply to one checkpoint's own spectra (nothing to amplify)", "k")
    with common.outputs([base, *finetuned], cache_dir=cache.folder) as plan:
        from weightlab.analysis.spectrum import spectrum as compute_spectrum
        from weightlab.compute.cache import DecompositionCache
        from weightlab.io import open_finetuned, open_weights

        compute = common.compute()
        base_ckpt = open_weights(base)
        fts = [open_finetuned(p, base_ckpt) for p in finetuned]
        with progress("spectrum") as (on_start, on_progress):
            result = compute_spectrum(
                base_ckpt, fts, options, compute, on_progress, on_start, DecompositionCache.of(cache)
            )
        emit(plan, result)
    common.show(result)
