"""`weightlab spectrum`: how fine-tuning moved each weight matrix's singular values and vectors."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from weightlab.analysis.spectrum import SpectrumOptions, spectrum as compute_spectrum
from weightlab.compute.cache import DEFAULT_BYTES, DecompositionCache
from weightlab.cli.app import Common, analysis_command, emit, progress, refuse_unless
from weightlab.io import open_finetuned, open_weights


@analysis_command()
def spectrum(
    base: Path = typer.Argument(..., help="Base checkpoint (file or folder)."),
    finetuned: Optional[List[Path]] = typer.Argument(
        None, help="Fine-tuned checkpoints or PEFT adapters of BASE (none with --values-only: BASE's own spectra)."),
    k: int = typer.Option(8, "-k", "--top-k", help="Top singular values/vectors for amplification and reorientation."),
    intruder_k: int = typer.Option(10, "--intruder-k", help="Top fine-tuned singular vectors checked for intruders."),
    epsilon: float = typer.Option(0.5, "--epsilon", help="Intruder threshold on max |cos| with any base singular vector."),
    keep: Optional[int] = typer.Option(None, "--keep", help="Singular values kept per matrix in --json (default all)."),
    values_only: bool = typer.Option(False, "--values-only",
                                     help="Singular values alone (norms, ranks, amplification): no vectors, much faster."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Where base decompositions are kept between runs "
                                             "[default: $WEIGHTLAB_CACHE or ~/.cache/weightlab/decompositions]."),
    cache_size: float = typer.Option(DEFAULT_BYTES / 2**30, "--cache-size", help="Bound of the cache folder in GiB."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Neither read nor write the decomposition cache."),
    common: Common = None,
) -> None:
    """Per-matrix SVD of base vs fine-tuned: amplification, norms and ranks, reorientation, intruders.

    Example: weightlab spectrum base/ ft/ --plots plots/ --json spectrum.json

    The base's decompositions are cached by content, so more fine-tunes of the same base (or a
    re-run) skip them. --values-only BASE alone gives the base's own spectra.
    """
    finetuned = finetuned or []
    refuse_unless(not no_cache and not values_only, "does not apply: nothing is cached with --no-cache or --values-only",
                  "cache_dir", "cache_size")
    refuse_unless(not values_only, "does not apply to --values-only (no singular vectors, so no intruders)",
                  "intruder_k", "epsilon")
    refuse_unless(bool(finetuned), "does not apply to one checkpoint's own spectra (nothing to amplify)", "k")
    options = SpectrumOptions(k, intruder_k, epsilon, keep, values_only, **common.filters)
    compute = common.compute()
    cache = None if no_cache else DecompositionCache.at(cache_dir, cache_size)
    with common.outputs([base, *finetuned], cache_dir=cache and cache.folder) as plan:
        base_ckpt = open_weights(base)
        fts = [open_finetuned(p, base_ckpt) for p in finetuned]
        with progress("spectrum") as (on_start, on_progress):
            result = compute_spectrum(base_ckpt, fts, options, compute, on_progress, on_start, cache)
        emit(plan, result)
    common.show(result)
