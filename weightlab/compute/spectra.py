"""Spectral quantities shared by the analyses and the surgeries: a matrix's decomposition
(cached by content), the best match of a fine-tune's singular vectors among the base's, intruder
dimensions, and the entropy of a spectrum's energy.

Intruder dimensions (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of
Equivalence", §3): u'_i among the top k of W' = W + ΔW with max_j |cos(u'_i, u_j)| < ε over every
left singular vector u_j of the base.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from weightlab.compute.cache import DecompositionCache, entry_key, tensor_digest
from weightlab.compute.gram import GramSpectrum, decompose, top_singular
from weightlab.compute.svd import SVD

NULL = 1e-4  # σ_j ≤ NULL·σ₁: u_j = Wv_j/σ_j would carry float32 rounding of v_j times σ₁/σ_j


def energy_entropy(energy: torch.Tensor) -> float:
    """H = −Σ p ln p over the shares p = e/Σe of non-negative energies (σ², or eigenvalues of WᵀW);
    0 for a zero or rank-one spectrum."""
    total = float(energy.sum())
    p = energy[energy > 0].double() / total if total > 0 else energy[:0].double()
    return float(-(p * p.log()).sum())


def decomposition(
    w: torch.Tensor, cache: DecompositionCache | None, columns: int | None, digest: str | None = None
) -> GramSpectrum:
    """W's singular values and top `columns` Gram eigenvectors (all when None, none when 0): from
    the cache when it has them, else computed and stored. `digest` is W's `tensor_digest` when
    the caller has it. Each kind is one deterministic computation, so a warm run gives the bytes
    of a cold one."""
    kind = "values" if columns == 0 else f"top{columns}" if columns else "all"
    return cached(cache, lambda: entry_key(kind, digest or tensor_digest(w)), w, columns, lambda: decompose(w, columns))


def update_values(
    w: torch.Tensor, w_ft: torch.Tensor, cache: DecompositionCache | None, digests: tuple[str, str] | None = None
) -> torch.Tensor:
    """Every singular value of the dense update W' − W (float64, descending), from the cache when
    it has them; `digests` are W's and W''s `tensor_digest` when the caller has them."""

    def key() -> str:
        return entry_key("update-values", *(digests or (tensor_digest(w), tensor_digest(w_ft))))

    return cached(cache, key, w, 0, lambda: decompose(w_ft - w, 0)).S


def cached(
    cache: DecompositionCache | None,
    key: Callable[[], str],
    w: torch.Tensor,
    columns: int | None,
    compute: Callable[[], GramSpectrum],
) -> GramSpectrum:
    """The entry of `key()` for a matrix shaped like `w`, or `compute()` stored under it."""
    if cache is None:
        return compute()
    name = key()
    found = cache.get(name, tuple(w.shape), columns)
    if found is not None:
        return found
    decomposed = compute()
    cache.put(name, decomposed)
    return decomposed


def top_columns(k: int, r: int) -> int | None:
    """How many base Gram eigenvectors to compute up front for metrics that read the top k: twice
    that, at least 32 (the best match of an aligned u'_i is then certified among them); all for
    small matrices."""
    columns = max(32, 2 * k)
    return None if columns >= r // 2 else columns


def left_cosines(w64: torch.Tensor, base: GramSpectrum, u_ft: torch.Tensor, columns: slice) -> torch.Tensor | None:
    """|⟨u'_i, u_j⟩| for the base left singular vectors j in `columns`, from its Gram eigenvectors:
    wide W has U = E; tall W has V = E and U = WVΣ⁻¹, used as (WᵀU')ᵀVΣ⁻¹ without forming U.
    None when some σ_j there is ≤ NULL·σ₁ (u_j is not determined well enough by W)."""
    e = base.vectors[:, columns].to(w64.device, torch.float64)
    if not base.tall:
        return (u_ft.mT @ e).abs()
    s = base.S[columns].to(w64.device)
    if float(s[-1]) <= NULL * float(base.S[0]):
        return None
    return ((w64.mT @ u_ft).mT @ e).abs() / s


def base_vectors(
    w: torch.Tensor, top: GramSpectrum, k: int, u_ft: torch.Tensor, whole: Callable[[], GramSpectrum]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The base's top-k U and Vh, and |⟨u'_i, u_j⟩| [kk, ·] over the base left singular vectors
    that can be u'_i's best match. From the top-K Gram eigenvectors: since Σ_j cos²_ij ≤ 1, no
    u_j beyond the top K can beat the best of them once best² > 1 − Σ_{j<K} cos²_ij; only when
    that fails for some i (an intruder candidate) is `whole()` decomposed for the rest. Where u_j
    is not determined by W (σ_j ≤ NULL·σ₁), the thin SVD decides."""
    w64, s = w.double(), top.S.to(w.device)
    r, width = s.shape[-1], top.vectors.shape[-1]
    cos = left_cosines(w64, top, u_ft, slice(0, width)) if float(s[k - 1]) > NULL * float(s[0]) else None
    if cos is not None and width < r:
        best = cos.max(-1).values
        if bool((best**2 <= 1 - (cos**2).sum(-1)).any()):
            rest = left_cosines(w64, whole(), u_ft, slice(width, r))
            cos = None if rest is None else torch.cat([cos, rest], -1)
    if cos is None:
        u, _, vh = torch.linalg.svd(w64, full_matrices=False)  # rare: float64, as exact as the rest
        return u[:, :k], vh[:k], (u_ft.mT @ u).abs()
    e = top.vectors[:, :k].to(w.device, torch.float64)
    if top.tall:
        return w64 @ e / s[:k], e.mT, cos
    return e, (w64.mT @ e / s[:k]).mT, cos


def intruder_dimensions(
    w: torch.Tensor, w_ft: torch.Tensor, k: int, epsilon: float, cache: DecompositionCache | None = None
) -> tuple[list[int], list[float], SVD]:
    """Shuttleworth et al. 2024, §3: the i < k among W''s top singular vectors with
    max_j |cos(u'_i, u_j)| < ε over every base left singular vector u_j. Returns those i, every
    top-k best-match cosine, and W''s top-k triplets (float64)."""
    k = min(k, min(w.shape))
    top_base = decomposition(w, cache, top_columns(k, min(w.shape)))
    _, top = top_singular(w_ft, k)
    _, _, cos = base_vectors(w, top_base, 1, top.U, functools.cache(lambda: decomposition(w, cache, None)))
    best = cos.max(-1).values[:k].tolist()
    return [i for i, c in enumerate(best) if c < epsilon], best, top
