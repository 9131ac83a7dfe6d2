"""Merge methods, one small function each, in a registry with their declared parameters.

Each method maps the tensors of one name — the base θ_b (or None), the models θ_1..θ_N and
their coefficients c_1..c_N (manual weights or NAN's) — to the merged tensor. τ_i = θ_i − θ_b.
The executor streams tensors, places them on the device and writes the result; methods only
compute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from weightlab.compute.svd import full_svd
from weightlab.domains import Domain, Real
from weightlab.errors import InvalidArgument


MAX_COEFFICIENT = 1e6  # |λ|, |c_i| beyond this only overflow float32 maths


@dataclass(frozen=True)
class Param:
    """One parameter a method declares: what users write (`--param NAME=VALUE`, a YAML key), its
    values, default and meaning."""

    name: str
    domain: Domain
    default: float
    help: str
    attribute: str = ""  # what the method reads (default: the name; `lambda` is a Python keyword)
    flag: str | None = None  # a command-line flag of its own, for the parameters most methods share

    @property
    def field(self) -> str:
        return self.attribute or self.name


LAMBDA = Param("lambda", Real(-MAX_COEFFICIENT, MAX_COEFFICIENT), 1.0, "scale λ of the merged task vector",
               "lam", "--lambda")
DENSITY = Param("density", Real(0, 1, low_open=True), 1.0, "fraction of entries kept", flag="--density")
GAMMA = Param("gamma", Real(0, 1, high_open=True), 0.01, "fraction of largest-magnitude entries dropped")
SLERP_EPSILON = Param("epsilon", Real(0, 1, high_open=True), 5e-4, "1 − |cos Ω| below which SLERP is linear")
SLERP_T = Param("t", Real(0, 1), 0.5, "position between the two models (0: the first)")


class Params:
    """A method's parameter values, read as attributes (`p.lam`, `p.density`)."""

    def __init__(self, values: dict[str, float]):
        self._values = dict(values)

    def __getattr__(self, name: str) -> float:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"this method declares no parameter {name!r}") from None

    def as_dict(self) -> dict[str, float]:
        return dict(self._values)


Generator = Callable[[int], torch.Generator]  # model index -> seeded generator for this tensor


@dataclass(frozen=True)
class MergeMethod:
    """A registry entry: everything the CLI, config validation, mergekit mapping and docs need."""

    name: str
    fn: Callable  # (base, models, coefficients, params, generator) -> merged tensor
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
    nan: bool = False  # always takes NAN coefficients

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def resolve(self, given: dict[str, Any]) -> Params:
        """Defaults overridden by `given` (names as users write them), each checked against its
        domain; a name the method does not declare is an error listing the ones it does."""
        for name, value in given.items():
            spec = self.param(name)
            if spec is None:
                known = ", ".join(p.name for p in self.params) or "none"
                raise InvalidArgument(f"{self.name} does not use {name} (its parameters: {known})")
            spec.domain.check(spec.flag or f"--param {name}", value)
        return Params({p.field: given.get(p.name, p.default) for p in self.params})


def average(base, models, coeffs, p: Params, gen: Generator) -> torch.Tensor:
    """Σ c_i θ_i / Σ c_i (Wortsman et al. 2022, "Model soups", uniform soup when c_i are equal)."""
    total = float(coeffs.sum())
    out = torch.zeros_like(models[0])
    for c, m in zip(coeffs.tolist(), models):
        out.add_(m, alpha=c / total)
    return out


def _add_task_vectors(base: torch.Tensor, taus, coeffs: torch.Tensor, lam: float) -> torch.Tensor:
    """θ_b + λ Σ c_i τ_i accumulated in place: two tensors of memory whatever the model count."""
    out = base.clone()
    for c, tau in zip(coeffs.tolist(), taus):
        out.add_(tau, alpha=lam * c)
    return out


def _task_vectors(base: torch.Tensor, models):
    """τ_i = θ_i − θ_b one at a time, in one reused buffer."""
    buffer = torch.empty_like(base)
    for m in models:
        yield torch.sub(m, base, out=buffer)


def task_arithmetic(base, models, coeffs, p: Params, gen: Generator) -> torch.Tensor:
    """θ_b + λ Σ c_i τ_i (Ilharco et al. 2023, "Editing Models with Task Arithmetic", eq. 1)."""
    return _add_task_vectors(base, _task_vectors(base, models), coeffs, p.lam)


def kth_largest(values: torch.Tensor, k: int, sample: int = 65_536) -> torch.Tensor:
    """The k-th largest of a flat tensor, exactly, without a full selection when it is large: a
    strided sample brackets the answer, one pass counts what lies above the bracket, and the
    selection runs only on the few values inside it (falling back to a full one if the bracket
    missed)."""
    n = values.numel()
    if n <= 4 * sample:
        return torch.kthvalue(values, n - k + 1).values
    probe = values[:: n // sample].sort().values
    q = 1 - k / n
    lo = probe[max(int((q - 0.01) * probe.numel()), 0)]
    hi = probe[min(int((q + 0.01) * probe.numel()), probe.numel() - 1)]
    above = int(torch.count_nonzero(values > hi))
    inside = values[(values >= lo) & (values <= hi)]
    need = k - above
    if 0 < need <= inside.numel():
        return torch.kthvalue(inside, inside.numel() - need + 1).values
    return torch.kthvalue(values, n - k + 1).values


def trim_top_magnitude(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k = int(density·n) largest-magnitude entries, zero the rest (TIES step 1); ties at
    the threshold go to the lowest indices, so exactly k survive."""
    if density >= 1:
        return tau
    flat = tau.reshape(-1)
    k = int(density * flat.numel())
    if k == 0:
        return torch.zeros_like(tau)
    magnitude = flat.abs()
    threshold = kth_largest(magnitude, k)
    mask = magnitude > threshold
    short = k - int(torch.count_nonzero(mask))
    if short > 0:
        mask[torch.nonzero(magnitude == threshold).flatten()[:short]] = True
    return torch.where(mask, flat, 0.0).reshape(tau.shape)


def elect_and_mean(taus: list[torch.Tensor], coeffs: torch.Tensor) -> torch.Tensor:
    """TIES steps 2-3: the sign of Σ_i c_i τ̂_i per entry, then the coefficient-weighted mean of
    the entries that agree with it (a disjoint mean: zero entries do not count). Accumulated one
    model at a time, so memory is the trimmed τ̂_i plus three tensors."""
    cs = coeffs.tolist()
    elected = torch.zeros_like(taus[0])
    for c, tau in zip(cs, taus):
        elected.add_(tau, alpha=c)
    elected = torch.sign(elected)
    merged, divisor = torch.zeros_like(elected), torch.zeros_like(elected)
    for c, tau in zip(cs, taus):
        agree = (torch.sign(tau) == elected) & (tau != 0)
        merged.add_(torch.where(agree, tau, 0.0), alpha=c)
        divisor.add_(agree.to(divisor.dtype), alpha=c)
    return torch.where(divisor != 0, merged / torch.where(divisor != 0, divisor, 1.0), 0.0)


def ties(base, models, coeffs, p: Params, gen: Generator) -> torch.Tensor:
    """TIES-Merging (Yadav et al. 2023, "Resolving Interference When Merging Models", Alg. 1):
    trim each τ_i to its top-density entries, elect signs, disjoint mean, scale by λ."""
    taus = [trim_top_magnitude(m - base, p.density) for m in models]
    return base + p.lam * elect_and_mean(taus, coeffs)


def dare_drop(tau: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE (Yu et al. 2024, "Language Models are Super Mario", eq. 2): keep each entry with
    probability `density` (Bernoulli, seeded on the CPU so every device gives the same mask)
    and rescale the kept ones by 1/density."""
    if density >= 1:
        return tau
    keep = torch.bernoulli(torch.full(tau.shape, density), generator=generator).to(tau.device, torch.bool)
    return torch.where(keep, tau / density, torch.zeros_like(tau))


def dare_linear(base, models, coeffs, p: Params, gen: Generator) -> torch.Tensor:
    """DARE then task arithmetic: θ_b + λ Σ c_i DARE(τ_i) (Yu et al. 2024, eq. 2 then Ilharco et al. 2023, eq. 1)."""
    taus = (dare_drop(tau, p.density, gen(i)) for i, tau in enumerate(_task_vectors(base, models)))
    return _add_task_vectors(base, taus, coeffs, p.lam)


def dare_ties(base, models, coeffs, p: Params, gen: Generator) -> torch.Tensor:
    """DARE then TIES' sign election and disjoint mean (Yu et al. 2024, eq. 2; Yadav et al. 2023, Alg. 1)."""
    taus = [dare_drop(m - base, p.density, gen(i)) for i, m in enumerate(models)]
    return base + p.lam * elect_and_mean(taus, coeffs)


def breadcrumbs_mask(tau: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs (Davari & Belilovsky 2024, §3): drop the largest γ·n entries by
    magnitude (outliers) and the smallest, keeping density·n entries in between (at most the
    n − γ·n left below the outliers)."""
    flat = tau.reshape(-1)
    n = flat.numel()
    n_top = int(gamma * n)
    n_keep = min(int(density * n), n - n_top)
    n_bottom = max(n - n_keep - n_top, 0)
    order = torch.argsort(flat.abs(), stable=True)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[order[n_bottom:n - n_top]] = True
    return (flat * mask).reshape(tau.shape)


def breadcrumbs(base, models, coeffs, p: Params, gen: Generator) -> torch.Tensor:
    """Breadcrumbs masks, then task arithmetic (Davari & Belilovsky 2024, §3)."""
    taus = (breadcrumbs_mask(tau, p.density, p.gamma) for tau in _task_vectors(base, models))
    return _add_task_vectors(base, taus, coeffs, p.lam)


def breadcrumbs_ties(base, models, coeffs, p: Params, gen: Generator) -> torch.Tensor:
    """Breadcrumbs masks, then TIES' sign election and disjoint mean (Davari & Belilovsky 2024, §3;
    Yadav et al. 2023, Alg. 1)."""
    taus = [breadcrumbs_mask(m - base, p.density, p.gamma) for m in models]
    return base + p.lam * elect_and_mean(taus, coeffs)


def slerp(base, models, coeffs, p: Params, gen: Generator) -> torch.Tensor:
    """Spherical interpolation of two models' flattened weights (Shoemake 1985):
    sin((1−t)Ω)/sin Ω·θ_1 + sin(tΩ)/sin Ω·θ_2, with cos Ω the cosine of the two; linear when
    the two are within ε of colinear."""
    a, b = models
    cos = float((a.reshape(-1) @ b.reshape(-1)) / (a.norm() * b.norm()).clamp_min(1e-12))
    if 1 - abs(cos) < p.epsilon:
        return (1 - p.t) * a + p.t * b
    omega = math.acos(max(-1.0, min(1.0, cos)))
    return (math.sin((1 - p.t) * omega) * a + math.sin(p.t * omega) * b) / math.sin(omega)


def model_stock(base, models, coeffs, p: Params, gen: Generator) -> torch.Tensor:
    """Model Stock (Jang et al. 2024, eq. 6): with cos θ the mean pairwise cosine of the task
    vectors, t = N cos θ / (1 + (N − 1) cos θ) and θ = t·mean_i θ_i + (1 − t)·θ_b."""
    taus = [(m - base).reshape(-1) for m in models]
    n = len(taus)
    cosines = [float(taus[i] @ taus[j] / (taus[i].norm() * taus[j].norm()).clamp_min(1e-12))
               for i in range(n) for j in range(i + 1, n)]
    cos = sum(cosines) / len(cosines)
    t = n * cos / (1 + (n - 1) * cos) if (1 + (n - 1) * cos) != 0 else 0.0
    return t * torch.stack(models).mean(0) + (1 - t) * base


def tsv(base, models, coeffs, p: Params, gen: Generator) -> torch.Tensor:
    """TSV-Merge (Gargiulo et al. 2025, "Task Singular Vectors", Alg. 1): keep the top 1/N of
    each c_i·τ_i's singular triplets, concatenate them, replace the stacked U and V by their
    nearest orthogonal matrices (U = PΣQᵀ → PQᵀ), and add λ·U⊥ΣV⊥ᵀ. Vectors: λ·mean of c_i τ_i."""
    taus = [c * (m - base) for c, m in zip(coeffs.tolist(), models)]
    if base.ndim < 2 or base.numel() == 0 or min(base.shape[0], base[0].numel()) < 2:
        return base + p.lam * torch.stack(taus).sum(0) / len(taus)
    shape = base.shape
    mats = [t.reshape(shape[0], -1) for t in taus]
    keep = max(1, min(mats[0].shape) // len(mats))
    parts = [full_svd(m).truncate(keep) for m in mats]
    u = torch.cat([s.U for s in parts], 1)
    sigma = torch.cat([s.S for s in parts])
    v = torch.cat([s.Vh.T for s in parts], 1)

    def orthogonal(x: torch.Tensor) -> torch.Tensor:
        q = full_svd(x)
        return q.U @ q.Vh

    delta = (orthogonal(u) * sigma) @ orthogonal(v).T
    return base + p.lam * delta.reshape(shape)


TV = (LAMBDA,)
METHODS: dict[str, MergeMethod] = {m.name: m for m in [
    MergeMethod("average", average, "Σ c_i θ_i / Σ c_i", "Wortsman et al. 2022, *Model soups* (uniform soup)",
                needs_base=False, task_vectors=False, normalises=True, mergekit="linear"),
    MergeMethod("task-arithmetic", task_arithmetic, "θ_b + λ Σ c_i τ_i",
                "Ilharco et al. 2023, *Editing Models with Task Arithmetic*, eq. 1", TV, mergekit="task_arithmetic"),
    MergeMethod("ties", ties, "trim each τ_i to its top-density entries by magnitude; elect the sign of Σ c_i τ̂_i per "
                "entry; coefficient-weighted mean of the entries that agree; θ_b + λ·that",
                "Yadav et al. 2023, *TIES-Merging*, Alg. 1", (LAMBDA, DENSITY), normalises=True, mergekit="ties"),
    MergeMethod("dare-linear", dare_linear, "keep each entry with probability density (seeded Bernoulli), rescale by "
                "1/density, then task arithmetic", "Yu et al. 2024, *DARE*, eq. 2", (LAMBDA, DENSITY),
                mergekit="dare_linear"),
    MergeMethod("dare-ties", dare_ties, "DARE, then TIES' election and disjoint mean",
                "Yu et al. 2024, *DARE*, eq. 2; Yadav et al. 2023", (LAMBDA, DENSITY), normalises=True,
                mergekit="dare_ties"),
    MergeMethod("breadcrumbs", breadcrumbs, "drop the largest γ·n and the smallest entries, keeping density·n; task "
                "arithmetic", "Davari & Belilovsky 2024, *Model Breadcrumbs*, §3", (LAMBDA, DENSITY, GAMMA),
                mergekit="breadcrumbs"),
    MergeMethod("breadcrumbs-ties", breadcrumbs_ties, "breadcrumbs masks, then TIES' election and mean",
                "Davari & Belilovsky 2024, §3; Yadav et al. 2023", (LAMBDA, DENSITY, GAMMA), normalises=True,
                mergekit="breadcrumbs_ties"),
    MergeMethod("slerp", slerp, "two models: sin((1−t)Ω)/sinΩ·θ_1 + sin(tΩ)/sinΩ·θ_2, linear within epsilon of colinear",
                "Shoemake 1985, *Animating rotation with quaternion curves*", (SLERP_EPSILON, SLERP_T), needs_base=False,
                coefficients=False, task_vectors=False, min_models=2, max_models=2, mergekit="slerp"),
    MergeMethod("model-stock", model_stock, "t = N cosθ/(1+(N−1)cosθ) with cosθ the mean pairwise cosine of the τ_i; "
                "t·mean θ_i + (1−t)θ_b", "Jang et al. 2024, *Model Stock*, eq. 6", coefficients=False, min_models=2,
                mergekit="model_stock"),
    MergeMethod("nan", task_arithmetic, "task arithmetic with NAN coefficients",
                "Si et al. 2025, *NAN*, arXiv 2505.16148", TV, nan=True),
    MergeMethod("tsv", tsv, "per matrix: top 1/N singular triplets of each c_i τ_i, stacked; U and V replaced by their "
                "nearest orthogonal matrices; θ_b + λ U⊥ΣV⊥ᵀ (vectors: λ·mean)",
                "Gargiulo et al. 2025, *Task Singular Vectors*, Alg. 1", TV),
]}


def parameter_names() -> tuple[str, ...]:
    """Every parameter name some method declares, once each (config files take them as keys)."""
    return tuple(dict.fromkeys(p.name for m in METHODS.values() for p in m.params))


def mergekit_names() -> dict[str, str]:
    """mergekit's merge_method names -> ours."""
    return {m.mergekit: m.name for m in METHODS.values() if m.mergekit}


def methods_table() -> str:
    """The methods as a Markdown table, from the registry (docs/merge.md holds a copy; a test
    keeps the two equal)."""
    lines = ["| method | formula | parameters (default) | base | coefficients | mergekit | reference |",
             "|---|---|---|---|---|---|---|"]
    for m in METHODS.values():
        params = ", ".join(f"`{p.name}` ({p.default:g})" for p in m.params) or "—"
        coefficients = ("NAN (always)" if m.nan else f"on {'τ_i' if m.task_vectors else 'θ_i'}; manual or NAN") \
            if m.coefficients else "—"
        count = "" if m.min_models == 1 and m.max_models is None else \
            f" ({m.min_models} models)" if m.min_models == m.max_models else f" (≥ {m.min_models} models)"
        lines.append(f"| `{m.name}`{count} | {m.formula} | {params} | {'needed' if m.needs_base else '—'} | "
                     f"{coefficients} | {m.mergekit or '—'} | {m.reference} |")
    return "\n".join(lines)
