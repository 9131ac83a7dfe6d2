"""The analyses as Python functions: `inspect`, `spectrum`, `esd`, `quant_error`, `compare`, `angles`,
`gaussian`, `tsd`, `experts`. Each takes models from anywhere (a path, a Hub ID, a module, a PEFT model, a
mapping of names to tensors or arrays), the command's options as keywords, and returns its typed
result; the command of the same name is this function with its options parsed."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from weightlab.api.frame import Run, api_function, emit
from weightlab.errors import InvalidArgument
from weightlab.io.sources import Named, Source, Sources, describe, is_in_memory
from weightlab.options import (
    AnglesOptions,
    CacheOptions,
    CompareOptions,
    ESDOptions,
    ExpertsOptions,
    GaussianOptions,
    QuantErrorOptions,
    SpectrumOptions,
    TSDOptions,
)

if TYPE_CHECKING:
    from weightlab.analysis.angles import AnglesResult
    from weightlab.analysis.compare import CompareResult
    from weightlab.analysis.esd import ESDResult
    from weightlab.analysis.experts import ExpertsResult
    from weightlab.analysis.gaussian import GaussianResult
    from weightlab.analysis.quantization import QuantErrorResult
    from weightlab.analysis.spectrum import SpectrumResult
    from weightlab.analysis.tsd import TSDResult
    from weightlab.inventory import Inventory

ANALYSIS = ("device", "dtype", "threads", "ray", "ray_timeout", "json", "csv", "plots", "report", "force")
FILES = ("json", "csv", "force")
LOCAL = tuple(k for k in ANALYSIS if k not in ("dtype", "ray", "ray_timeout"))  # float64 maths, on this machine


def many(sources: Sources | None) -> list[Source]:
    """One model or several: a list or tuple is several, and so is a mapping of names to models
    (`{"math": model, "code": "code-ft/"}`: the names label models in memory); anything else (a
    path, a module, a mapping of names to tensors) is one."""
    if sources is None:
        return []
    if isinstance(sources, (list, tuple)) or _is_iterator(sources):
        return list(sources)  # type: ignore[arg-type]
    if isinstance(sources, Mapping) and sources and all(_is_model(v) for v in sources.values()):
        named = [Named(name, model) if is_in_memory(model) else model for name, model in sources.items()]
        return named  # each value is a model (_is_model)
    return [sources]  # type: ignore[list-item]  # one model: a path, a module or a mapping of tensors


def _open(models: Sequence[Source], base: Source | None) -> tuple[Any, list[Any]]:
    """The base (None without one) and each model: with a base, a fine-tune or adapter of it (its
    weights W'); without, full weights; fused Mixture-of-Experts tensors as one matrix per expert
    (`io.experts`). Torch loads here, after the inputs were checked."""
    from weightlab.io.experts import per_expert
    from weightlab.io.open import open_finetuned, open_weights

    base_ckpt = per_expert(open_weights(base)) if base is not None else None
    return base_ckpt, [per_expert(open_finetuned(m, base_ckpt) if base_ckpt else open_weights(m)) for m in models]


def _is_iterator(value: object) -> bool:
    """A generator or other one-pass iterable of models (never a path, a mapping or a module)."""
    return hasattr(value, "__next__")


def _is_model(value: object) -> bool:
    return isinstance(value, (str, Path, Mapping)) or hasattr(value, "state_dict")


@api_function(FILES, flags={"name_filter": "--filter"})
def inspect(checkpoint: Source, name_filter: str | None = None, *, run: Run) -> Inventory:
    """What a checkpoint holds: every tensor's name, shape, dtype, size, layer and role, and totals per dtype.

    Parameters
    ----------
    checkpoint : path, Hub ID, torch.nn.Module, PeftModel or mapping of names to tensors/arrays
        The model (headers alone are read from files).
    name_filter : str, optional
        Only tensors whose name matches this regex (command line: --filter).
    {options}

    Returns
    -------
    Inventory
        `.tensors` (one row each), `.totals` per dtype; `.to_pandas()` for a DataFrame.
    """
    from weightlab.inventory import inventory

    with run.outputs([checkpoint]) as plan:
        from weightlab.io.open import open_checkpoint  # torch loads here

        result = inventory(open_checkpoint(checkpoint), name_filter)
        emit(plan, result)
    return result


@api_function(ANALYSIS)
def spectrum(
    base: Source,
    finetuned: Sources | None = None,
    *,
    options: SpectrumOptions,
    cache: CacheOptions,
    run: Run,
) -> SpectrumResult:
    """Per-matrix SVD of base vs fine-tuned: amplification, norms and ranks, reorientation, intruders.

    Parameters
    ----------
    base : path, Hub ID, torch.nn.Module or mapping of names to tensors/arrays
        The base model.
    finetuned : a model, a PeftModel or adapter folder of `base`, or a list of them (or a dict: name -> model)
        The fine-tunes (none with ``values_only=True``: the base's own spectra).
    {options}

    Returns
    -------
    SpectrumResult
        One row per matrix and fine-tune in ``.to_pandas()``; ``.plot()`` draws what ``--plots`` draws.

    References
    ----------
    Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence" (intruder dimensions);
    Hu et al. 2021, "LoRA" (amplification, Sec. 7).
    """
    finetuned = many(finetuned)
    run.refuse_unless(
        not cache.no_cache and not options.values_only,
        "does not apply: nothing is cached with --no-cache or --values-only",
        "cache_dir",
        "cache_size",
    )
    run.refuse_unless(
        not options.values_only,
        "does not apply to --values-only (no singular vectors, so no intruders)",
        "intruder_k",
        "epsilon",
    )
    run.refuse_unless(bool(finetuned), "does not apply to one checkpoint's own spectra (nothing to amplify)", "k")
    with run.outputs([base, *finetuned], cache_dir=cache.folder) as plan:
        from weightlab.analysis.spectrum import spectrum as compute_spectrum
        from weightlab.compute.cache import DecompositionCache

        compute = run.compute()
        base_ckpt, fts = _open(finetuned, base)
        with run.progress("spectrum", "matrices") as (on_start, on_progress):
            kept = None if options.values_only else DecompositionCache.of(cache)  # values alone: one eigvalsh
            result = compute_spectrum(base_ckpt, fts, options, compute, on_progress, on_start, kept)
        emit(plan, result)
    return result


@api_function(ANALYSIS)
def esd(checkpoint: Source, base: Source | None = None, *, options: ESDOptions, run: Run) -> ESDResult:
    """Heavy-tailed spectral densities, WeightWatcher's way: power-law α (x_min by KS distance), α̂,
    norms, stable rank, Marchenko–Pastur spikes and correlation traps, per matrix.

    Parameters
    ----------
    checkpoint : a model (path, Hub ID, module, mapping; with `base`: a fine-tune, PeftModel or adapter)
        The weights analysed.
    base : a model, optional
        Also the spectral density of ΔW = checkpoint − base (command line: --base).
    {options}

    Returns
    -------
    ESDResult

    References
    ----------
    Martin & Mahoney 2021, "Implicit self-regularization in deep neural networks", JMLR 22(165);
    Martin, Peng & Mahoney 2021, Nature Communications 12:4122 (α̂, eq. 4).
    """
    run.refuse_unless(
        options.traps, "does not apply with --no-traps (it seeds the shuffles that look for traps)", "seed"
    )
    with run.outputs([checkpoint, base]) as plan:
        from weightlab.analysis.esd import esd as compute_esd

        compute = run.compute()
        base_ckpt, (ckpt,) = _open([checkpoint], base)
        with run.progress("esd", "matrices") as (on_start, on_progress):
            result = compute_esd(ckpt, base_ckpt, options, compute, on_progress, on_start)
        emit(plan, result)
    return result


@api_function(ANALYSIS)
def quant_error(
    reference: Source,
    quantized: Sources,
    lora: Source | None = None,
    *,
    options: QuantErrorOptions,
    cache: CacheOptions,
    run: Run,
) -> QuantErrorResult:
    """What quantization did to each weight matrix: relative error and SNR, bits per weight,
    whether the error is noise-like or structured, whether the top singular values and
    directions survived, the shift of WeightWatcher's α, and the layers that suffer most.

    Parameters
    ----------
    reference : a model (path, Hub ID, module, mapping)
        The full-precision weights the quantized models were made from.
    quantized : a model, or a list of them (or a dict: name -> model)
        Quantized versions of `reference` (GGUF, GPTQ, AWQ, bitsandbytes, FP8, compressed-tensors,
        MLX, or any dense checkpoint), read dequantized.
    lora : a PEFT adapter (folder or PeftModel), optional
        Added to each quantized model first: the error of Q + s·BA against W, what a LoRA trained
        or initialised on the quantized base (LoftQ) leaves of the quantization error
        (command line: --lora).
    {options}

    Returns
    -------
    QuantErrorResult
        One row per matrix and quantized model in ``.to_pandas()``; ``.models()`` per model.

    References
    ----------
    Marchenko & Pastur 1967 (the white-noise spectrum the error is held against);
    Martin & Mahoney 2021, JMLR 22(165) (α); Si et al. 2025 (σ'/σ and reorientation).
    """
    quantized = many(quantized)
    run.refuse_unless(
        not cache.no_cache, "does not apply: nothing is cached with --no-cache", "cache_dir", "cache_size"
    )
    with run.outputs([reference, *quantized, lora], cache_dir=cache.folder) as plan:
        from weightlab.analysis.quantization import quant_error as compute_quant_error
        from weightlab.compute.cache import DecompositionCache
        from weightlab.io.adapter import AdaptedCheckpoint, LoraAdapter
        from weightlab.io.open import open_checkpoint

        compute = run.compute()
        _, (reference_ckpt, *quantized_ckpts) = _open([reference, *quantized], None)
        if lora is not None:
            adapter = open_checkpoint(lora)
            if not isinstance(adapter, LoraAdapter):
                raise InvalidArgument("--lora is full weights, not a LoRA adapter", describe(lora))
            quantized_ckpts = [AdaptedCheckpoint(q, adapter) for q in quantized_ckpts]
        with run.progress("quant-error", "matrices") as (on_start, on_progress):
            result = compute_quant_error(
                reference_ckpt, quantized_ckpts, options, compute, on_progress, on_start, DecompositionCache.of(cache)
            )
        emit(plan, result)
    return result


@api_function(LOCAL, flags={"calibration": "--calibration", "tokenizer": "--tokenizer"})
def experts(
    checkpoint: Source,
    base: Source | None = None,
    calibration: str | Path | None = None,
    tokenizer: str | Path | None = None,
    *,
    options: ExpertsOptions,
    run: Run,
) -> ExpertsResult:
    """A Mixture-of-Experts model's experts, block by block: how alike they are (cosine of their
    weights, overlap of their top singular directions), which are near copies, the router's rows,
    and, against a base, how far each expert moved.

    Parameters
    ----------
    checkpoint : a model (path, Hub ID, module, mapping; with `base`: a fine-tune, PeftModel or adapter)
        An MoE model: per-expert tensors (Mixtral's w1/w2/w3, `mlp.experts.N.gate_proj`) or
        transformers' fused ones (`mlp.experts.gate_up_proj`), read one expert at a time.
    base : a model, optional
        The MoE it was fine-tuned from: how far each expert and router row moved (command line: --base).
    calibration : path, optional
        A text file (one text per line, or JSONL with "text"): the model runs on it, and each
        expert's routed share and REAP saliency are measured (command line: --calibration).
    tokenizer : path, optional
        The tokenizer folder for `calibration` (default: the checkpoint's own; command line: --tokenizer).
    {options}

    Returns
    -------
    ExpertsResult
        ``.blocks`` (E×E cosine and overlap per block, near-copy groups, router norms); one row per
        expert in ``.to_pandas()``.

    References
    ----------
    Chen et al. 2025, "Retraining-Free Merging of Sparse MoE via Hierarchical Clustering" (HC-SMoE);
    Ilharco et al. 2023, "Editing Models with Task Arithmetic" (cosines of weight vectors);
    Lasby et al. 2025, "REAP the Experts: Why Pruning Prevails for One-Shot MoE Compression" (REAP).
    """
    run.refuse_unless(calibration is not None, "applies to --calibration only", "tokenizer")
    with run.outputs([checkpoint, base, calibration, tokenizer]) as plan:
        from weightlab.analysis.experts import experts as compute_experts

        base_ckpt, (ckpt,) = _open([checkpoint], base)
        device = run.compute().device
        routes = None
        if calibration is not None:
            from weightlab.compute.activations import find_tokenizer
            from weightlab.compute.routing import routing
            from weightlab.io.calibration import read_calibration

            texts = read_calibration(calibration)
            routes = routing(ckpt, texts, find_tokenizer([ckpt], None if tokenizer is None else str(tokenizer)), device)
        with run.progress("experts", "MoE blocks") as (on_start, on_progress):
            result = compute_experts(
                ckpt,
                base_ckpt,
                options,
                device,
                on_progress,
                on_start,
                routes,
                None if calibration is None else str(calibration),
            )
        emit(plan, result)
    return result


@api_function(ANALYSIS)
def compare(finetuned: Sources, base: Source, *, options: CompareOptions, run: Run) -> CompareResult:
    """A bank of fine-tunes of one base: pairwise task-vector cosine, subspace overlap, TIES sign
    conflict and norm ratios, and a clustering.

    Parameters
    ----------
    finetuned : list of models (paths, Hub IDs, modules, PeftModels, mappings), or a dict: name -> model
        Two or more fine-tunes or adapters of `base`.
    base : a model
        The base every fine-tune started from (command line: --base).
    {options}

    Returns
    -------
    CompareResult

    References
    ----------
    Yadav et al. 2023, "TIES-Merging", NeurIPS (sign conflict, Sec. 3);
    Ilharco et al. 2023, "Editing Models with Task Arithmetic", ICLR (task-vector cosine).
    """
    finetuned = many(finetuned)
    with run.outputs([base, *finetuned]) as plan:
        from weightlab.analysis.compare import compare as compute_compare

        compute = run.compute()
        base_ckpt, fts = _open(finetuned, base)
        with run.progress("compare", "tensors") as (on_start, on_progress):
            result = compute_compare(base_ckpt, fts, options, compute, on_progress, on_start)
        emit(plan, result)
    return result


@api_function(ANALYSIS)
def angles(a: Source, b: Source, base: Source | None = None, *, options: AnglesOptions, run: Run) -> AnglesResult:
    """Principal angles between the top-k singular subspaces of matching matrices of `a` and `b`.

    Parameters
    ----------
    a, b : models (paths, Hub IDs, modules, mappings; with `base`: fine-tunes, PeftModels or adapters)
    base : a model, optional
        Compare task vectors a − base and b − base instead of weights (command line: --base).
    {options}

    Returns
    -------
    AnglesResult

    References
    ----------
    Björck & Golub 1973, "Numerical methods for computing angles between linear subspaces",
    Math. Comp. 27(123) (cosines are the singular values of U_aᵀU_b).
    """
    run.refuse_unless(
        options.svd == "randomized", "seeds only --svd randomized (the exact SVD has no randomness)", "seed"
    )
    with run.outputs([a, b, base]) as plan:
        from weightlab.analysis.angles import angles as compute_angles

        compute = run.compute()
        base_ckpt, (ckpt_a, ckpt_b) = _open([a, b], base)
        with run.progress("angles", "matrices") as (on_start, on_progress):
            result = compute_angles(ckpt_a, ckpt_b, base_ckpt, options, compute, on_progress, on_start)
        emit(plan, result)
    return result


@api_function(tuple(n for n in ANALYSIS if n != "dtype"))  # storage precision; moments in float64
def gaussian(checkpoint: Source, base: Source | None = None, *, options: GaussianOptions, run: Run) -> GaussianResult:
    """Moments, normality tests and a shape label per tensor; with `base`, the same for ΔW and its spread vs depth.

    Parameters
    ----------
    checkpoint : a model (with `base`: a fine-tune, PeftModel or adapter of it)
    base : a model, optional
        Also test ΔW = checkpoint − base and its trend with depth (command line: --base).
    {options}

    Returns
    -------
    GaussianResult

    References
    ----------
    D'Agostino & Pearson 1973, Biometrika 60(3) (K²); Anderson & Darling 1954, JASA 49(268).
    """
    with run.outputs([checkpoint, base]) as plan:
        from weightlab.analysis.gaussian import gaussian as compute_gaussian

        compute = run.compute()
        base_ckpt, (ckpt,) = _open([checkpoint], base)
        with run.progress("gaussian", "tensors") as (on_start, on_progress):
            result = compute_gaussian(ckpt, base_ckpt, options, compute, on_progress, on_start)
        emit(plan, result)
    return result


@api_function(ANALYSIS)
def tsd(base: Source, finetuned: Source, save: str | Path | None = None, *, options: TSDOptions, run: Run) -> TSDResult:
    """Task-specific directions: the base's singular directions with the largest change rate |u_iᵀΔWv_i|/σ_i.

    Parameters
    ----------
    base : a model
    finetuned : a fine-tune, PeftModel or adapter of `base` (e.g. a short warm-up run)
    save : path, optional
        Store indices, u, v, σ, δ per matrix (.safetensors) for ``init_lora(method="tsd")``.
    {options}

    Returns
    -------
    TSDResult

    References
    ----------
    Si et al. 2025, "Unleashing the Power of Task-Specific Directions in Parameter Efficient
    Fine-tuning", ICLR (change rate δ_i, eq. 3).
    """
    with run.outputs([base, finetuned], save=save) as plan:
        from weightlab.analysis.tsd import save_directions
        from weightlab.analysis.tsd import tsd as compute_tsd

        compute = run.compute()
        base_ckpt, (ft,) = _open([finetuned], base)
        with run.progress("tsd", "matrices") as (on_start, on_progress):
            result, vectors = compute_tsd(
                base_ckpt, ft, options, compute, on_progress, on_start, keep_vectors=save is not None
            )
        if save:
            save_directions(
                plan.path("--save"),
                vectors,
                {"base": describe(base), "finetuned": describe(finetuned), "top": str(options.top)},
            )
        emit(plan, result)
    return result
