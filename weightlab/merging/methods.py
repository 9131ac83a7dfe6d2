"""Merge methods, one small function each, in a registry with their declared parameters.

Each method maps the tensors of one name — the base θ_b (or None), the models θ_1..θ_N and
their coefficients c_1..c_N (manual weights or NAN's) — to the merged tensor. τ_i = θ_i − θ_b.
The executor streams tensors, places them on the device and writes the result; methods only
compute.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from weightlab.compute.scratch import buffer
from weightlab.compute.trim import kth_largest
from weightlab.domains import Choice
from weightlab.errors import InvalidArgument
from weightlab.merging.covariance import ace
from weightlab.merging.data_aware import fisher, regmean
from weightlab.merging.elementwise import arcee_fusion, nearswap, ram, sce
from weightlab.merging.iso_cts import iso_cts, iso_cts_block, iso_cts_map
from weightlab.merging.modifiers import MODIFIERS
from weightlab.merging.params import (
    ALPHA,
    COMMON,
    DELLA_EPSILON,
    DENSITY,
    EPS,
    FILTER_WISE,
    FLOOR,
    GAMMA,
    HETEROGENEITY,
    LAMBDA,
    LR,
    MAX_ITER,
    NEARSWAP_T,
    NORMALIZE,
    NORMALIZE_WEIGHTS,
    NUSLERP_FLATTEN,
    NUSLERP_ROW_WISE,
    RAM_ALPHA,
    RAM_EPSILON,
    RAM_R,
    RANK,
    RATIO,
    REFINE,
    RESCALE,
    RIDGE,
    SCALE,
    SELECT_TOPK,
    SLERP_EPSILON,
    SLERP_T,
    STEPS,
    TOL,
    Generator,
    Param,
    Params,
    Tensor,
    resolve,
)
from weightlab.merging.sparsify import dare_drop, della_drop, rescaled
from weightlab.merging.spherical import karcher_mean, multislerp, nuslerp
from weightlab.merging.subspace import (
    cart,
    is_tall_matrix,
    iso_c,
    iso_c_block,
    iso_c_map,
    tsv,
    wudi,
    wudi_adam,
)
from weightlab.merging.task_vectors import task_vectors
from weightlab.merging.ties import elect_and_mean, ties, ties_block, ties_trims

MERGEKIT_REQUIRED: Any = type("Required", (), {"__repr__": lambda self: "required"})()  # no default there


@dataclass(frozen=True)
class MergeMethod:
    """A registry entry: everything the CLI, config validation, mergekit mapping and docs need."""

    name: str
    fn: Callable[..., Tensor]  # (base, models, coefficients, params, generator) -> merged tensor
    formula: str  # in one line, for --help and docs/merge.md
    reference: str  # paper, and equation or algorithm
    params: tuple[Param, ...] = ()
    needs_base: bool = True
    coefficients: bool = True  # takes per-model coefficients c_i: --weights, or NAN's (--coeff nan)
    task_vectors: bool = True  # the coefficients weigh task vectors τ_i (else the weights θ_i)
    normalises: bool = False  # divides by a sum of coefficients: they must be non-negative, not all zero
    min_models: int = 1
    max_models: int | None = None
    mergekit: str | None = None  # its merge_method name in mergekit's YAML
    # every parameter mergekit reads for the method, with mergekit's default (MERGEKIT_REQUIRED:
    # none, it must be given), and what mergekit does with a base_model: "required", "optional"
    # (used when given) or "input" (merged as one more model)
    mergekit_defaults: Mapping[str, Any] = field(default_factory=dict)
    mergekit_base: str = "required"
    optional_base: bool = False  # uses a base when given (task vectors), merges the models without one
    nan: bool = False  # always takes NAN coefficients
    random: bool = False  # draws at random, seeded by --seed
    calibration: str | None = None  # runs the models on --calibration text: "grams" | "grams-merged" | "fisher"
    # Merging a large tensor a block of rows at a time: `blockwise(base, models, coeffs, params,
    # state)` on blocks, after `statistics(rows, coeffs, params)` read the tensor's blocks (a
    # `RowReader`) for what the method needs of the whole (TIES: thresholds; Iso-C: a Gram
    # matrix). Bit for bit the whole-tensor result for elementwise methods; `splits` says which
    # shapes may be split. Its result may be a buffer it reuses (`scratch`): the caller writes it
    # before the next call.
    blockwise: Callable[..., Tensor] | None = None
    statistics: Callable[..., Any] | None = None
    splits: Callable[[tuple[int, ...]], bool] = lambda shape: True
    # blockwise and statistics take the models' blocks as stored (bfloat16, say): each use
    # subtracts the base, read in the maths' dtype, first, and that promotes exactly, so the
    # result is the same bits without a converted copy of every model (the largest cost of a
    # 7B task-arithmetic merge after the disk)
    stored_models: bool = False

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def resolve(self, given: dict[str, Any]) -> Params:
        """The method's parameters: `given` (checked against each declaration), else defaults."""
        return resolve(self.params, given, self.name)


def average(base: Tensor, models: Sequence[Tensor], coeffs: Tensor, p: Params, gen: Generator | None) -> Tensor:
    """Σ c_i θ_i / Σ c_i (Wortsman et al. 2022, "Model soups", uniform soup when c_i are equal);
    Σ c_i θ_i without `normalize`."""
    total = float(coeffs.sum()) if p.value("normalize") else 1.0
    out = torch.zeros_like(models[0])
    for c, m in zip(coeffs.tolist(), models):
        out.add_(m, alpha=c / total)
    return out


def _scale(coeffs: Tensor, p: Params) -> float:
    """λ, divided by Σ c_i where the method normalises (`normalize`; a sum within 1e-8 of 0 counts as 1)."""
    total = float(coeffs.sum())
    return p.lam / (total if abs(total) >= 1e-8 else 1.0) if p.get("normalize", False) else p.lam


def _add_task_vectors(base: Tensor, taus: Iterable[Tensor], coeffs: Tensor, lam: float) -> Tensor:
    """θ_b + λ Σ c_i τ_i accumulated in place: two tensors of memory whatever the model count
    (buffers kept from one block to the next inside `scratch.reusing_buffers`)."""
    out = buffer("merged", base.shape, base.dtype, base.device).copy_(base)
    for c, tau in zip(coeffs.tolist(), taus):
        out.add_(tau, alpha=lam * c)
    return out


def task_arithmetic(base: Tensor, models: Sequence[Tensor], coeffs: Tensor, p: Params, gen: Generator | None) -> Tensor:
    """θ_b + λ Σ c_i τ_i (Ilharco et al. 2023, "Editing Models with Task Arithmetic", eq. 1); with
    `normalize`, λ Σ c_i τ_i / Σ c_i (mergekit's option)."""
    return _add_task_vectors(base, task_vectors(base, models), coeffs, _scale(coeffs, p))


def dare_linear(base: Tensor, models: Sequence[Tensor], coeffs: Tensor, p: Params, gen: Generator) -> Tensor:
    """DARE then task arithmetic: θ_b + λ Σ c_i DARE(τ_i) (Yu et al. 2024, eq. 2 then Ilharco et al. 2023, eq. 1)."""
    densities, rescale = p.each("density", len(models)), p.value("rescale")
    taus = (dare_drop(tau, densities[i], gen(i), rescale) for i, tau in enumerate(task_vectors(base, models)))
    return _add_task_vectors(base, taus, coeffs, _scale(coeffs, p))


def dare_ties(base: Tensor, models: Sequence[Tensor], coeffs: Tensor, p: Params, gen: Generator) -> Tensor:
    """DARE then TIES' sign election and disjoint mean (Yu et al. 2024, eq. 2; Yadav et al. 2023, Alg. 1)."""
    densities, rescale = p.each("density", len(models)), p.value("rescale")
    taus = [dare_drop(m - base, densities[i], gen(i), rescale) for i, m in enumerate(models)]
    return base + p.lam * elect_and_mean(taus, coeffs, p.value("normalize"))


def _della_taus(base: Tensor, models: Sequence[Tensor], p: Params, gen: Generator) -> list[Tensor]:
    densities, epsilons = p.each("density", len(models)), p.each("epsilon", len(models))
    taus = []
    for i, m in enumerate(models):
        if densities[i] < 1 and not (0 < densities[i] - epsilons[i] and densities[i] + epsilons[i] < 1):
            raise InvalidArgument(
                f"della keeps entries with probabilities density ± epsilon, which must lie in (0, 1): "
                f"density {densities[i]:g}, epsilon {epsilons[i]:g} for model {i + 1}"
            )
        taus.append(della_drop(m - base, densities[i], epsilons[i], gen(i), p.value("rescale")))
    return taus


def della(base: Tensor, models: Sequence[Tensor], coeffs: Tensor, p: Params, gen: Generator) -> Tensor:
    """DELLA-Merging (Deep et al. 2024, §3): MAGPRUNE each τ_i (`sparsify.della_drop`), elect signs by
    mass and take the coefficient-weighted mean of the agreeing entries (TIES' steps 2-3), θ_b + λ·that."""
    return base + p.lam * elect_and_mean(_della_taus(base, models, p, gen), coeffs, p.value("normalize"))


def della_linear(base: Tensor, models: Sequence[Tensor], coeffs: Tensor, p: Params, gen: Generator) -> Tensor:
    """MAGPRUNE each τ_i (Deep et al. 2024, §3.1), then task arithmetic: θ_b + λ Σ c_i τ̂_i."""
    return _add_task_vectors(base, _della_taus(base, models, p, gen), coeffs, _scale(coeffs, p))


def breadcrumbs_mask(tau: torch.Tensor, density: float, gamma: float, rescale: str = "none") -> torch.Tensor:
    """Model Breadcrumbs (Davari & Belilovsky 2024, §3): drop the largest γ·n entries by magnitude
    (outliers) and the smallest, keeping density·n entries above the smallest: where fewer than
    γ·n lie above those, fewer outliers go (mergekit's rule). Density 1 keeps τ whole. The kept
    entries are rescaled as `sparsify.rescaled` says ("l1", or "none")."""
    if density >= 1:
        return tau
    flat = tau.reshape(-1)
    n = flat.numel()
    n_keep, n_top = int(density * n), int(gamma * n)
    n_bottom = max(0, n - n_keep - n_top)
    order = torch.argsort(flat.abs(), stable=True)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[order[n_bottom : n_bottom + n_keep]] = True
    return rescaled(flat, keep, 1.0, rescale).reshape(tau.shape)


def _breadcrumbs_taus(base: Tensor, models: Sequence[Tensor], p: Params) -> list[Tensor]:
    densities, gammas = p.each("density", len(models)), p.each("gamma", len(models))
    return [breadcrumbs_mask(m - base, densities[i], gammas[i], p.value("rescale")) for i, m in enumerate(models)]


def breadcrumbs(base: Tensor, models: Sequence[Tensor], coeffs: Tensor, p: Params, gen: Generator | None) -> Tensor:
    """Breadcrumbs masks, then task arithmetic (Davari & Belilovsky 2024, §3)."""
    return _add_task_vectors(base, _breadcrumbs_taus(base, models, p), coeffs, _scale(coeffs, p))


def breadcrumbs_ties(
    base: Tensor, models: Sequence[Tensor], coeffs: Tensor, p: Params, gen: Generator | None
) -> Tensor:
    """Breadcrumbs masks, then TIES' sign election and disjoint mean (Davari & Belilovsky 2024, §3;
    Yadav et al. 2023, Alg. 1)."""
    return base + p.lam * elect_and_mean(_breadcrumbs_taus(base, models, p), coeffs, p.value("normalize"))


def slerp(base: Tensor, models: Sequence[Tensor], coeffs: Tensor, p: Params, gen: Generator | None) -> Tensor:
    """Spherical interpolation of two models' flattened weights (Shoemake 1985):
    sin((1−t)Ω)/sin Ω·θ_1 + sin(tΩ)/sin Ω·θ_2, with cos Ω the cosine of the two; linear when
    the two are within ε of colinear."""
    a, b = models
    cos = float((a.reshape(-1) @ b.reshape(-1)) / (a.norm() * b.norm()).clamp_min(1e-12))
    if 1 - abs(cos) < p.epsilon:
        return (1 - p.t) * a + p.t * b
    omega = math.acos(max(-1.0, min(1.0, cos)))
    return (math.sin((1 - p.t) * omega) * a + math.sin(p.t * omega) * b) / math.sin(omega)


def model_stock(base: Tensor, models: Sequence[Tensor], coeffs: Tensor, p: Params, gen: Generator | None) -> Tensor:
    """Model Stock (Jang et al. 2024, eq. 6): with cos θ the mean pairwise cosine of the task
    vectors, t = N cos θ / (1 + (N − 1) cos θ) and θ = t·mean_i θ_i + (1 − t)·θ_b (θ_b where the
    denominator vanishes); with `filter_wise`, one t per row of a matrix (per output filter)."""
    rows = p.value("filter_wise") and base.ndim > 1
    shape = (base.shape[0], -1) if rows else (1, -1)
    taus = [_unit_rows((m - base).reshape(shape)) for m in models]
    n = len(taus)
    cos = torch.stack([(taus[i] * taus[j]).sum(-1) for i in range(n) for j in range(i + 1, n)]).mean(0)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, 1.0, denominator))
    t = t.reshape(-1, *([1] * (base.ndim - 1))) if rows else t.reshape(())
    return t * torch.stack(list(models)).mean(0) + (1 - t) * base


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Each row of x as a unit vector (0 for a zero row), scaled by its largest entry first: a norm or
    dot product of entries beyond ~1e19 overflows float32, and the cosine does not depend on the scale."""
    if x.numel() == 0:
        return x
    scaled = x / x.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    unit: torch.Tensor = scaled / torch.linalg.vector_norm(scaled, dim=-1, keepdim=True).clamp_min(1e-12)
    return unit


def _order_statistic(x: torch.Tensor, index: int) -> torch.Tensor:
    """The value at 0-based position `index` of x sorted ascending (a flat tensor)."""
    return kth_largest(x, x.numel() - index)


def _minmax(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    span = high - low
    return torch.where(span > 0, (x - low) / torch.where(span > 0, span, 1.0), torch.zeros_like(x))


def pcb(base: Tensor, models: Sequence[Tensor], coeffs: Tensor, p: Params, gen: Generator | None) -> Tensor:
    """PCB-Merging (Du et al. 2024, "Parameter Competition Balancing for Model Merging", §3, eq. 2-5),
    per tensor. With d entries and N tasks:
    |τ_i| clipped to its order statistics at positions ⌊0.0001d⌋ and ⌊0.9999d⌋ − 1 (τ̃_i keeps the sign);
    intra-balancing exp(N·minmax(|τ̃_i|)²), inter-balancing tanh(τ_i ⊙ Σ_j τ_j), their product s_i;
    s_i clipped below at its order statistic ⌊(1 − ratio)d⌋ and min-max normalised to weights
    w_i ∈ [0, 1] (zero outside the top ratio); θ_b + λ Σ_i w_i τ̃_i / Σ_i w_i."""
    taus = [(m - base).reshape(-1) for m in models]
    d, n = taus[0].numel(), len(taus)
    if d == 0:
        return base.clone()
    total = torch.stack(taus).sum(0)
    merged, weight_sum = torch.zeros_like(total), torch.zeros_like(total)
    for tau in taus:
        magnitude = tau.abs()
        low, high = (
            _order_statistic(magnitude, int(d * 0.0001)),
            _order_statistic(magnitude, max(int(d * 0.9999) - 1, 0)),
        )
        magnitude = magnitude.clamp(low, high)
        intra = torch.exp(n * _minmax(magnitude, magnitude.min(), magnitude.max()) ** 2)
        score = intra * torch.tanh(tau * total)
        floor = _order_statistic(score, min(int(d * (1 - p.ratio)), d - 1))
        score = score.clamp_min(floor)
        weight = _minmax(score, floor, score.max())
        merged += weight * torch.sign(tau) * magnitude
        weight_sum += weight
    merged = merged / weight_sum.clamp_min(1e-12)
    return base + p.lam * merged.reshape(base.shape)


def nuslerp_method(
    base: Tensor | None, models: Sequence[Tensor], coeffs: Tensor, p: Params, gen: Generator | None
) -> Tensor:
    """NuSLERP (mergekit; Shoemake 1985's SLERP): at t = c_2/(c_1 + c_2) (½ when the sum vanishes) of the two models,
    or of their task vectors added to the base when there is one (`spherical.nuslerp`)."""
    c1, c2 = coeffs.tolist()
    t = 0.5 if abs(c1 + c2) < 1e-6 else c2 / (c1 + c2)
    row_wise, flatten = p.value("nuslerp_row_wise"), p.value("nuslerp_flatten")
    if base is None:
        return nuslerp(t, models[0], models[1], row_wise, flatten)
    return base + nuslerp(t, models[0] - base, models[1] - base, row_wise, flatten)


def multislerp_method(
    base: Tensor | None, models: Sequence[Tensor], coeffs: Tensor, p: Params, gen: Generator | None
) -> Tensor:
    """Multi-SLERP (Goddard 2025) of the models, or of their task vectors added to the base when
    there is one (`spherical.multislerp`)."""
    try:
        if base is None:
            return multislerp(models, coeffs.tolist(), p.value("normalize_weights"), p.eps)
        return base + multislerp([m - base for m in models], coeffs.tolist(), p.value("normalize_weights"), p.eps)
    except ValueError as e:
        raise InvalidArgument(f"multislerp: {e}; try other weights") from None


def karcher(base: Tensor | None, models: Sequence[Tensor], coeffs: Tensor, p: Params, gen: Generator | None) -> Tensor:
    """The Karcher mean of the models on the sphere, scaled by their mean norm (`spherical.karcher_mean`)."""
    return karcher_mean(models, int(p.max_iter), p.tol)


def sce_method(base: Tensor, models: Sequence[Tensor], coeffs: Tensor, p: Params, gen: Generator | None) -> Tensor:
    """SCE (Wan et al. 2024, "FuseChat", §3.3): `elementwise.sce`."""
    return sce(base, models, p.select_topk)


def ram_method(base: Tensor, models: Sequence[Tensor], coeffs: Tensor, p: Params, gen: Generator | None) -> Tensor:
    """RAM (Zhou et al. 2026, "Reinforced Agent Merging", arXiv 2601.13572): `elementwise.ram`."""
    return ram(base, models, p.epsilon)


def ramplus_method(base: Tensor, models: Sequence[Tensor], coeffs: Tensor, p: Params, gen: Generator | None) -> Tensor:
    """RAM+ tensor-local (Zhou et al. 2026, arXiv 2601.13572): `elementwise.ram` with r and α."""
    return ram(base, models, p.epsilon, p.r, p.alpha)


def nearswap_method(base: Tensor, models: Sequence[Tensor], coeffs: Tensor, p: Params, gen: Generator | None) -> Tensor:
    """NearSwap (alchemonaut 2024, QuartetAnemoi-70B's model card): `elementwise.nearswap`."""
    return nearswap(base, models[0], p.t)


def arcee_fusion_method(base: Tensor, models: Sequence[Tensor], coeffs: Tensor, p: Params, gen: Generator) -> Tensor:
    """Arcee Fusion (Arcee AI 2025): `elementwise.arcee_fusion`, its quantile sample seeded."""
    return arcee_fusion(base, models[0], gen(0))


def passthrough(
    base: Tensor | None, models: Sequence[Tensor], coeffs: Tensor, p: Params, gen: Generator | None
) -> Tensor:
    """Passthrough (mergekit's): one model's tensor, times `scale` when given; with layer slices, how
    a frankenmerge stacks layers of several models."""
    scale = p.value("scale")
    return models[0] if scale is None else models[0] * scale


TV = (LAMBDA,)
MERGEKIT_GTA = {  # mergekit's task arithmetic family
    "weight": MERGEKIT_REQUIRED,
    "lambda": 1.0,
    "density": 1.0,
    "normalize": False,
    "rescale": "none",
}
KEEP_EACH = (DENSITY.per(),)
BREADCRUMBS_RESCALE = replace(RESCALE, domain=Choice("none", "l1"), default="none")
METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in [
        MergeMethod(
            "average",
            average,
            "Σ c_i θ_i / Σ c_i (Σ c_i θ_i without normalize)",
            "Wortsman et al. 2022, *Model soups* (uniform soup)",
            (NORMALIZE,),
            needs_base=False,
            task_vectors=False,
            normalises=True,
            mergekit="linear",
            mergekit_defaults={"weight": MERGEKIT_REQUIRED, "normalize": True},
            mergekit_base="input",
            blockwise=lambda base, models, coeffs, p, states: average(base, models, coeffs, p, None),
        ),
        MergeMethod(
            "task-arithmetic",
            task_arithmetic,
            "θ_b + λ Σ c_i τ_i (÷ Σ c_i with normalize)",
            "Ilharco et al. 2023, *Editing Models with Task Arithmetic*, eq. 1",
            (LAMBDA, replace(NORMALIZE, default=False)),
            mergekit="task_arithmetic",
            mergekit_defaults=MERGEKIT_GTA,
            blockwise=lambda base, models, coeffs, p, states: task_arithmetic(base, models, coeffs, p, None),
            stored_models=True,
        ),
        MergeMethod(
            "ties",
            ties,
            "trim each τ_i to its top-density entries by magnitude (at least one); elect the sign of Σ c_i τ̂_i per "
            "entry; coefficient-weighted mean of the entries that agree (their sum without normalize); θ_b + λ·that",
            "Yadav et al. 2023, *TIES-Merging*, Alg. 1",
            (LAMBDA, *KEEP_EACH, NORMALIZE),
            normalises=True,
            mergekit="ties",
            mergekit_defaults={**MERGEKIT_GTA, "normalize": True},
            blockwise=ties_block,
            statistics=ties_trims,
            stored_models=True,
        ),
        MergeMethod(
            "dare-linear",
            dare_linear,
            "keep each entry with probability density (seeded Bernoulli), rescale the kept ones, then task arithmetic",
            "Yu et al. 2024, *DARE*, eq. 2",
            (LAMBDA, *KEEP_EACH, replace(NORMALIZE, default=False), RESCALE),
            mergekit="dare_linear",
            mergekit_defaults={**MERGEKIT_GTA, "rescale": "l1"},
            random=True,
        ),
        MergeMethod(
            "dare-ties",
            dare_ties,
            "DARE, then TIES' election and disjoint mean",
            "Yu et al. 2024, *DARE*, eq. 2; Yadav et al. 2023",
            (LAMBDA, *KEEP_EACH, NORMALIZE, RESCALE),
            normalises=True,
            mergekit="dare_ties",
            mergekit_defaults={**MERGEKIT_GTA, "rescale": "l1"},
            random=True,
        ),
        MergeMethod(
            "della",
            della,
            "MAGPRUNE: keep each entry with probability density ± ε by its magnitude's rank in its row, rescale "
            "the kept ones; then TIES' election and disjoint mean; θ_b + λ·that",
            "Deep et al. 2024, *DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based "
            "Sampling*, §3",
            (LAMBDA, *KEEP_EACH, DELLA_EPSILON, NORMALIZE, RESCALE),
            normalises=True,
            mergekit="della",
            mergekit_defaults={**MERGEKIT_GTA, "epsilon": 0.15, "normalize": True, "rescale": "l1"},
            random=True,
        ),
        MergeMethod(
            "della-linear",
            della_linear,
            "MAGPRUNE each τ_i, then task arithmetic",
            "Deep et al. 2024, *DELLA-Merging*, §3.1",
            (LAMBDA, *KEEP_EACH, DELLA_EPSILON, replace(NORMALIZE, default=False), RESCALE),
            mergekit="della_linear",
            mergekit_defaults={**MERGEKIT_GTA, "epsilon": 0.15, "rescale": "l1"},
            random=True,
        ),
        MergeMethod(
            "breadcrumbs",
            breadcrumbs,
            "drop the largest γ·n and the smallest entries, keeping density·n; task arithmetic",
            "Davari & Belilovsky 2024, *Model Breadcrumbs*, §3",
            (
                LAMBDA,
                replace(DENSITY, default=0.9).per(),
                GAMMA.per(),
                replace(NORMALIZE, default=False),
                BREADCRUMBS_RESCALE,
            ),
            mergekit="breadcrumbs",
            mergekit_defaults={**MERGEKIT_GTA, "gamma": 0.01},
        ),
        MergeMethod(
            "breadcrumbs-ties",
            breadcrumbs_ties,
            "breadcrumbs masks, then TIES' election and mean",
            "Davari & Belilovsky 2024, §3; Yadav et al. 2023",
            (LAMBDA, replace(DENSITY, default=0.9).per(), GAMMA.per(), NORMALIZE, BREADCRUMBS_RESCALE),
            normalises=True,
            mergekit="breadcrumbs_ties",
            mergekit_defaults={**MERGEKIT_GTA, "gamma": 0.01},  # mergekit: no normalising here
        ),
        MergeMethod(
            "slerp",
            slerp,
            "two models: sin((1−t)Ω)/sinΩ·θ_1 + sin(tΩ)/sinΩ·θ_2, linear within epsilon of colinear",
            "Shoemake 1985, *Animating rotation with quaternion curves*",
            (SLERP_EPSILON, SLERP_T),
            needs_base=False,
            coefficients=False,
            task_vectors=False,
            min_models=2,
            max_models=2,
            mergekit="slerp",
            mergekit_defaults={"t": MERGEKIT_REQUIRED},
        ),
        MergeMethod(
            "nuslerp",
            nuslerp_method,
            "two models (of their task vectors with a base): SLERP at t = c_2/(c_1 + c_2), of the flattened "
            "tensors, of each row, or of each column (nuslerp_row_wise)",
            "Shoemake 1985; mergekit's NuSLERP",
            (NUSLERP_FLATTEN, NUSLERP_ROW_WISE),
            needs_base=False,
            optional_base=True,
            task_vectors=False,
            min_models=2,
            max_models=2,
            mergekit="nuslerp",
            mergekit_defaults={"weight": MERGEKIT_REQUIRED, "nuslerp_flatten": True, "nuslerp_row_wise": False},
            mergekit_base="optional",
        ),
        MergeMethod(
            "multislerp",
            multislerp_method,
            "barycentric SLERP of any number of models (of task vectors with a base): the weighted mean of the "
            "unit tensors on the sphere, the tangent vectors' weighted sum mapped back, times the weighted mean norm",
            "Goddard 2025, *Multi-SLERP* (mergekit)",
            (NORMALIZE_WEIGHTS, EPS),
            needs_base=False,
            optional_base=True,
            task_vectors=False,
            mergekit="multislerp",
            mergekit_defaults={"weight": MERGEKIT_REQUIRED, "normalize_weights": True, "eps": 1e-8},
            mergekit_base="optional",
        ),
        MergeMethod(
            "karcher",
            karcher,
            "the Karcher (Riemannian) mean of the unit tensors, by fixed-point iteration, times the mean norm",
            "Karcher 1977, *Riemannian center of mass and mollifier smoothing*, CPAM 30(5); mergekit's karcher",
            (MAX_ITER, TOL),
            needs_base=False,
            coefficients=False,
            task_vectors=False,
            mergekit="karcher",
            mergekit_defaults={"max_iter": 10, "tol": 1e-5},
            mergekit_base="input",
        ),
        MergeMethod(
            "model-stock",
            model_stock,
            "t = N cosθ/(1+(N−1)cosθ) with cosθ the mean pairwise cosine of the τ_i (per row with filter_wise); "
            "t·mean θ_i + (1−t)θ_b",
            "Jang et al. 2024, *Model Stock*, eq. 6",
            (FILTER_WISE,),
            coefficients=False,
            min_models=2,
            mergekit="model_stock",
            mergekit_defaults={"filter_wise": False},
        ),
        MergeMethod(
            "sce",
            sce_method,
            "keep the top select_topk entries by variance across the τ_i; weights ∝ each τ_i's mean square; "
            "erase entries against the elected sign; θ_b + Σ w_iτ_i·m_i / Σ w_i·m_i",
            "Wan et al. 2024, *FuseChat: Knowledge Fusion of Chat Models*, §3.3 (SCE)",
            (SELECT_TOPK,),
            coefficients=False,
            mergekit="sce",
            mergekit_defaults={"select_topk": 1.0},
        ),
        MergeMethod(
            "ram",
            ram_method,
            "an entry one τ_i moves (|τ_i| > ε) keeps it; an entry several move, their mean",
            "Zhou et al. 2026, *Reinforced Agent Merging* (RAM), arXiv 2601.13572",
            (RAM_EPSILON,),
            coefficients=False,
            mergekit="ram",
            mergekit_defaults={"epsilon": 1e-5},
        ),
        MergeMethod(
            "ramplus-tl",
            ramplus_method,
            "RAM, with each τ_i's own entries scaled by 1 + r·clip(shared/own, 0, α) (tensor-local)",
            "Zhou et al. 2026, *Reinforced Agent Merging* (RAM+), arXiv 2601.13572",
            (RAM_R, RAM_ALPHA, RAM_EPSILON),
            coefficients=False,
            mergekit="ramplus_tl",
            mergekit_defaults={"r": 0.1, "alpha": 0.2, "epsilon": 1e-5},
        ),
        MergeMethod(
            "nearswap",
            nearswap_method,
            "base and one model: each entry moves to the model's by clip(t/|θ − θ_b|, 0, 1)",
            "alchemonaut 2024, *QuartetAnemoi-70B* (NearSwap); mergekit's nearswap",
            (NEARSWAP_T,),
            coefficients=False,
            task_vectors=False,
            max_models=1,
            mergekit="nearswap",
            mergekit_defaults={"t": MERGEKIT_REQUIRED},
        ),
        MergeMethod(
            "arcee-fusion",
            arcee_fusion_method,
            "base and one model: keep the model's change where |θ − θ_b|·KL(softmax θ ‖ softmax θ_b) reaches "
            "the median + 1.5·IQR of the tensor's",
            "Arcee AI 2025, *Arcee Fusion* (mergekit's arcee_fusion)",
            coefficients=False,
            max_models=1,
            random=True,
            mergekit="arcee_fusion",
        ),
        MergeMethod(
            "passthrough",
            passthrough,
            "one model's tensors as they are (times scale when given): with layer slices, a frankenmerge",
            "mergekit's passthrough",
            (SCALE,),
            needs_base=False,
            coefficients=False,
            task_vectors=False,
            max_models=1,
            mergekit="passthrough",
            mergekit_defaults={"scale": None},
            mergekit_base="input",
            blockwise=lambda base, models, coeffs, p, states: passthrough(base, models, coeffs, p, None),
        ),
        MergeMethod(
            "nan",
            task_arithmetic,
            "task arithmetic with NAN coefficients",
            "Si et al. 2025, *NAN*, arXiv 2505.16148",
            TV,
            nan=True,
        ),
        MergeMethod(
            "tsv",
            tsv,
            "per matrix: top 1/N singular triplets of each c_i τ_i, stacked; U and V replaced by their "
            "nearest orthogonal matrices; θ_b + λ U⊥ΣV⊥ᵀ (vectors: λ·mean)",
            "Gargiulo et al. 2025, *Task Singular Vectors*, Alg. 1",
            TV,
        ),
        MergeMethod(
            "iso-c",
            iso_c,
            "per matrix: Σ c_i τ_i = UΣVᵀ with every σ replaced by their mean σ̄; θ_b + λσ̄UVᵀ",
            "Marczak et al. 2025, *No Task Left Behind: Isotropic Model Merging*, §4.1, eq. 6",
            TV,
            blockwise=iso_c_block,
            statistics=iso_c_map,
            splits=is_tall_matrix,
            stored_models=True,
        ),
        MergeMethod(
            "iso-cts",
            iso_cts,
            "per matrix: top common·r directions of Σ c_i τ_i, plus each task's top (r−k)/N "
            "outside them; U, V orthogonalised; flat spectrum at the mean σ; θ_b + λ·that",
            "Marczak et al. 2025, *No Task Left Behind*, §4.2, Alg. 1",
            (LAMBDA, COMMON),
            blockwise=iso_cts_block,
            statistics=iso_cts_map,
            splits=lambda shape: len(shape) == 2 and min(shape) > 1,
            stored_models=True,
        ),
        MergeMethod(
            "wudi",
            wudi,
            "per matrix: τ_m = argmin Σ_i ‖(τ_m − τ_i)τ_iᵀ‖²/‖τ_i‖², solved exactly (τ_m = B·G⁺); θ_b + λτ_m",
            "Cheng et al. 2025, *Whoever Started the Interference Should End It* "
            "(WUDI-Merging), eq. 8; closed form ours",
            TV,
            coefficients=False,
        ),
        MergeMethod(
            "wudi-adam",
            wudi_adam,
            "the WUDI loss minimised by Adam from Σ τ_i, as the paper does",
            "Cheng et al. 2025, *WUDI-Merging*, §4.2",
            (LAMBDA, STEPS, LR),
            coefficients=False,
        ),
        MergeMethod(
            "cart",
            cart,
            "θ̄ = Σ c_iθ_i/Σ c_i; per matrix θ̄ + λ Σ_i SVD_k(θ_i − θ̄), k = rank·min(m, n)",
            "Choi et al. 2024, *Revisiting Weight Averaging for Model Merging* (CART), §3, eq. 4",
            (LAMBDA, RANK),
            needs_base=False,
            task_vectors=False,
            normalises=True,
        ),
        MergeMethod(
            "pcb",
            pcb,
            "intra- × inter-balancing scores exp(N·minmax|τ_i|²)·tanh(τ_i ⊙ Σ_j τ_j); each task keeps "
            "its top ratio, weighted mean of the clipped τ_i; θ_b + λ·that",
            "Du et al. 2024, *Parameter Competition Balancing for Model Merging* (PCB), §3, eq. 2-5",
            (LAMBDA, RATIO),
            coefficients=False,
        ),
        MergeMethod(
            "ace",
            ace,
            "per matrix: C_t = τ̃_tᵀτ̃_t from each task vector's centred rows (unit trace when the tasks' "
            "energies differ); τ = Σ_t τ_t(C_t+ε_tI)·(Σ_t(C_t+ε_tI) + mean_t C_t)⁻¹, plus a flat top-k "
            "spectral refinement for heterogeneous tasks; θ_b + λτ",
            "Xu et al. 2026, *ACE-Merging: Data-Free Model Merging with Adaptive Covariance Estimation*, CVPR, §3",
            (LAMBDA, RIDGE, REFINE, HETEROGENEITY),
            coefficients=False,
        ),
        MergeMethod(
            "regmean",
            regmean,
            "per linear layer: W = (Σ_i W_i G̃_i)(Σ_i G̃_i)⁻¹, G_i = X_iᵀX_i of model i's inputs on its "
            "calibration text, off-diagonal entries scaled by α; other tensors: the mean",
            "Jin et al. 2023, *Dataless Knowledge Fusion by Merging Weights of Language Models* (RegMean), "
            "ICLR, §3, eq. 2",
            (ALPHA,),
            needs_base=False,
            coefficients=False,
            task_vectors=False,
            calibration="grams",
        ),
        MergeMethod(
            "regmean++",
            regmean,
            "RegMean with each layer's inputs taken from the merged model's earlier layers, merged layer by layer",
            "Nguyen et al. 2025, *RegMean++: Enhancing Effectiveness and Generalization of Regression Mean "
            "for Model Merging*, §3, eq. 5",
            (ALPHA,),
            needs_base=False,
            coefficients=False,
            task_vectors=False,
            calibration="grams-merged",
        ),
        MergeMethod(
            "fisher",
            fisher,
            "θ = Σ_i c_iF_iθ_i / Σ_i c_iF_i per entry, F_i model i's diagonal Fisher on its calibration text "
            "(labels drawn from the model's own predictions)",
            "Matena & Raffel 2022, *Merging Models with Fisher-Weighted Averaging*, NeurIPS, eq. 4",
            (FLOOR,),
            needs_base=False,
            task_vectors=False,
            normalises=True,
            random=True,
            calibration="fisher",
        ),
    ]
}


def parameter_names() -> tuple[str, ...]:
    """Every parameter name some method or modifier declares, once each (config files take them as keys)."""
    declared = [m.params for m in METHODS.values()] + [m.params for m in MODIFIERS.values()]
    return tuple(dict.fromkeys(p.name for params in declared for p in params))


def mergekit_names() -> dict[str, str]:
    """mergekit's merge_method names -> ours."""
    return {m.mergekit: m.name for m in METHODS.values() if m.mergekit}


def methods_table() -> str:
    """The methods as a Markdown table, from the registry (docs/merge.md holds a copy; a test
    keeps the two equal)."""
    lines = [
        "| method | formula | parameters (default) | base | coefficients | mergekit | reference |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in METHODS.values():
        params = ", ".join(f"`{p.name}` ({p.shown_default})" for p in m.params) or "—"
        coefficients = (
            ("NAN (always)" if m.nan else f"on {'τ_i' if m.task_vectors else 'θ_i'}; manual or NAN")
            if m.coefficients
            else "—"
        )
        count = (
            ""
            if m.min_models == 1 and m.max_models is None
            else f" ({m.min_models} models)"
            if m.min_models == m.max_models
            else f" (≥ {m.min_models} models)"
        )
        lines.append(
            f"| `{m.name}`{count} | {m.formula} | {params} | {'needed' if m.needs_base else '—'} | "
            f"{coefficients} | {m.mergekit or '—'} | {m.reference} |"
        )
    lines += [
        "",
        "Modifiers, after any method with a base (`--svc`, `--lines`, or `modifiers: [svc, lines]`):",
        "",
        "| modifier | formula | parameters (default) | reference |",
        "|---|---|---|---|",
    ]
    for mod in MODIFIERS.values():
        params = ", ".join(f"`{p.name}` ({p.shown_default})" for p in mod.params)
        lines.append(f"| `{mod.name}` | {mod.formula} | {params} | {mod.reference} |")
    return "\n".join(lines)
