"""Merge methods that work in the singular subspaces of each weight matrix's task vectors.

Each takes the tensors of one name (base θ_b, models θ_i, coefficients c_i) like every merge
method. Matrices (2-D, or conv kernels seen as out × rest) get the method; other tensors (biases,
norms) get θ_b + λ·mean_i c_i τ_i, as the papers do for non-matrix parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from weightlab.compute.deltas import numerical_rank
from weightlab.compute.gram import add_to_gram, eigen, gram, is_tall, to_singular
from weightlab.compute.rows import RowReader
from weightlab.compute.svd import SVD, full_svd
from weightlab.merging.params import Generator, Params, Tensor
from weightlab.merging.task_vectors import task_vectors


def is_matrix(t: torch.Tensor) -> bool:
    return t.ndim >= 2 and t.numel() > 0 and min(t.shape[0], t[0].numel()) >= 2


def nearest_orthogonal(x: torch.Tensor) -> torch.Tensor:
    """The (semi-)orthogonal matrix closest to x in Frobenius norm: x = PΣQᵀ → PQᵀ (Schönemann 1966)."""
    q = full_svd(x)
    return q.U @ q.Vh


def scaled_task_vectors(base: Tensor, models: Sequence[Tensor], coeffs: Tensor) -> list[Tensor]:
    return [c * (m - base) for c, m in zip(coeffs.tolist(), models)]


def mean_update(base: torch.Tensor, taus: list[torch.Tensor], lam: float) -> torch.Tensor:
    return base + lam * torch.stack(taus).sum(0) / len(taus)


def tsv(base: Tensor, models: Sequence[Tensor], coeffs: Tensor, p: Params, gen: Generator | None) -> Tensor:
    """TSV-Merge (Gargiulo et al. 2025, "Task Singular Vectors", Alg. 1): keep the top 1/N of
    each c_i·τ_i's singular triplets, concatenate them, replace the stacked U and V by their
    nearest orthogonal matrices, and add λ·U⊥ΣV⊥ᵀ."""
    taus = scaled_task_vectors(base, models, coeffs)
    if not is_matrix(base):
        return mean_update(base, taus, p.lam)
    mats = [t.reshape(base.shape[0], -1) for t in taus]
    keep = max(1, min(mats[0].shape) // len(mats))
    left, right = tsv_factors([full_svd(m).truncate(keep) for m in mats])
    return base + p.lam * (left @ right).reshape(base.shape)


def tsv_factors(parts: list[SVD]) -> tuple[torch.Tensor, torch.Tensor]:
    """TSV-M's merged update U⊥ΣV⊥ᵀ as factors (U⊥Σ, V⊥ᵀ), from each task's kept singular triplets:
    the stacked U and V replaced by their nearest orthogonal matrices (Gargiulo et al. 2025, Alg. 1)."""
    u = torch.cat([s.U for s in parts], 1)
    sigma = torch.cat([s.S for s in parts])
    v = torch.cat([s.Vh.mT for s in parts], 1)
    return nearest_orthogonal(u) * sigma, nearest_orthogonal(v).mT


def iso_c(base: Tensor, models: Sequence[Tensor], coeffs: Tensor, p: Params, gen: Generator | None) -> Tensor:
    """Iso-C (Marczak et al. 2025, "No Task Left Behind: Isotropic Model Merging with Common and
    Task-Specific Subspaces", §4.1, eq. 6): Δ = Σ_i c_i τ_i = UΣVᵀ; every singular value is
    replaced by their mean σ̄ = (1/r)Σ_j σ_j over the r non-zero ones (numerical rank; all min(m, n)
    of them for a full fine-tune's sum); θ_b + λ·σ̄·U_rV_rᵀ. On a rank-deficient sum (densified LoRA
    updates) the flat spectrum spans the sum's range: null directions, which any SVD picks
    arbitrarily, are not invented.

    σ̄·U_rV_rᵀ is computed without the SVD, from the smaller Gram matrix (`isotropic_map`):
    for a tall Δ, Δ·σ̄V_rΣ_r⁻¹V_rᵀ (a wide one mirrored). That is half the time of an SVD with
    vectors and holds no U, and a tall Δ's Gram matrix sums over blocks of rows: the executor
    merges a large tall matrix a block at a time (`iso_c_map`, `iso_c_block`)."""
    if not is_matrix(base):
        return mean_update(base, scaled_task_vectors(base, models, coeffs), p.lam)
    delta = weighted_sum(base, models, coeffs).reshape(base.shape[0], -1)
    shape = (delta.shape[0], delta.shape[1])
    iso = isotropic_map(gram(delta), shape).to(delta.dtype)
    flat = delta @ iso if is_tall(delta) else iso @ delta
    return base + p.lam * flat.reshape(base.shape)


def weighted_sum(base: Tensor, models: Sequence[Tensor], coeffs: Tensor) -> Tensor:
    """Σ_i c_i τ_i, with one task vector at a time in memory."""
    total = torch.zeros_like(base)
    for c, tau in zip(coeffs.tolist(), task_vectors(base, models)):
        total.add_(tau, alpha=c)
    return total


def isotropic_map(g: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """σ̄·E_rΣ_r⁻¹E_rᵀ from the Gram matrix G = EΣ²Eᵀ of an m×n Δ (`compute.gram`: E = V for a
    tall Δ, U for a wide one), r its numerical rank: Δ·map (tall) or map·Δ (wide) is σ̄·U_rV_rᵀ,
    since U_r = ΔV_rΣ_r⁻¹. float64, side × side."""
    lam, e = eigen(g)
    s = to_singular(lam)
    r = numerical_rank(s, shape)
    if r == 0:
        return torch.zeros_like(g)
    e = e[:, :r]
    return s[:r].mean() * (e / s[:r]) @ e.mT


def is_tall_matrix(shape: tuple[int, ...]) -> bool:
    """A 2-D shape with more rows than columns: its Gram matrix sums over blocks of rows."""
    return len(shape) == 2 and shape[0] > shape[1] > 1


def iso_c_map(rows: RowReader, coeffs: Tensor, p: Params) -> torch.Tensor:
    """`isotropic_map` of a tall Δ = Σ c_i τ_i read a block of rows at a time (its Gram matrix
    ΔᵀΔ is the sum of the blocks')."""
    g = None
    for blocks in rows.all_blocks():
        g = add_to_gram(g, weighted_sum(blocks[0], blocks[1:], coeffs))
    assert g is not None
    return isotropic_map(g, (rows.shape[0], rows.shape[1]))


def iso_c_block(base: Tensor, models: list[Tensor], coeffs: Tensor, p: Params, iso: torch.Tensor) -> Tensor:
    """Iso-C on a block of rows of a tall matrix, with the map `iso_c_map` made of the whole."""
    return base + p.lam * (weighted_sum(base, models, coeffs) @ iso.to(base.dtype))


def cart(base: Tensor, models: Sequence[Tensor], coeffs: Tensor, p: Params, gen: Generator | None) -> Tensor:
    """CART (Choi et al. 2024, "Revisiting Weight Averaging for Model Merging", §3, eq. 4):
    centred arithmetic with rank reduction. θ̄ = Σ_i c_iθ_i / Σ_i c_i; each θ_i − θ̄ is cut to its
    top k = max(1, round(rank·min(m, n))) singular triplets; θ̄ + λ Σ_i SVD_k(θ_i − θ̄)."""
    weights = coeffs / coeffs.sum()
    centre: Tensor = sum((w * m for w, m in zip(weights.tolist(), models)), torch.zeros_like(models[0]))
    if not is_matrix(centre):
        return centre
    shape = centre.shape
    k = max(1, round(p.rank * min(shape[0], centre[0].numel())))
    out = centre.reshape(shape[0], -1).clone()
    for m in models:
        part = full_svd((m - centre).reshape(shape[0], -1)).truncate(k)
        out += p.lam * (part.U * part.S) @ part.Vh
    return out.reshape(shape)


def _wudi_terms(mats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """G = Σ_i w_i τ_iᵀτ_i and B = Σ_i w_i τ_iτ_iᵀτ_i with w_i = 1/‖τ_i‖²_F (zero updates left out),
    in float64: the loss is tr(XGXᵀ) − 2tr(XBᵀ) + const, its gradient 2(XG − B)."""
    n = mats[0].shape[1]
    gram = torch.zeros(n, n, dtype=torch.float64, device=mats[0].device)
    target = torch.zeros(mats[0].shape, dtype=torch.float64, device=mats[0].device)
    for m in mats:
        m = m.double()
        norm2 = float((m * m).sum())
        if norm2 > 0:
            g = m.T @ m / norm2
            gram += g
            target += m @ g
    return gram, target


def wudi_objective(x: torch.Tensor, mats: list[torch.Tensor]) -> float:
    """Σ_i ‖(x − τ_i)τ_iᵀ‖²_F / ‖τ_i‖²_F (Cheng et al. 2025, eq. 8), for tests and reports."""
    total = 0.0
    for m in mats:
        norm2 = float((m.double() ** 2).sum())
        if norm2 > 0:
            total += float((((x.double() - m.double()) @ m.double().T) ** 2).sum()) / norm2
    return total


def wudi(base: Tensor, models: Sequence[Tensor], coeffs: Tensor, p: Params, gen: Generator | None) -> Tensor:
    """WUDI-Merging (Cheng et al. 2025, "Whoever Started the Interference Should End It", eq. 8),
    solved exactly: the loss Σ_i ‖(τ_m − τ_i)τ_iᵀ‖²_F/‖τ_i‖²_F is quadratic in τ_m, with normal
    equations τ_m·G = B (G = Σ_i τ_iᵀτ_i/‖τ_i‖², B = Σ_i τ_iτ_iᵀτ_i/‖τ_i‖²). The minimum-norm
    solution τ_m = B·G⁺ (eigenvalues of G below ε·λ_max treated as zero) is the optimum the
    paper's Adam approaches; θ_b + λτ_m."""
    taus = [m - base for m in models]
    if not is_matrix(base):
        return mean_update(base, taus, p.lam)
    mats = [t.reshape(base.shape[0], -1) for t in taus]
    gram, target = _wudi_terms(mats)
    values, vectors = torch.linalg.eigh(gram)
    cutoff = float(values.max()) * gram.shape[0] * torch.finfo(torch.float64).eps if values.numel() else 0.0
    inverse = torch.where(values > cutoff, 1.0 / values.clamp_min(1e-300), torch.zeros_like(values))
    merged: Tensor = ((target @ vectors) * inverse) @ vectors.T
    return base + p.lam * merged.to(base.dtype).reshape(base.shape)


def wudi_adam(base: Tensor, models: Sequence[Tensor], coeffs: Tensor, p: Params, gen: Generator | None) -> Tensor:
    """WUDI-Merging as the paper runs it (Cheng et al. 2025, §4.2): Adam (β = 0.9, 0.999) on the
    same loss from τ_m = Σ_i τ_i, `steps` iterations at learning rate `lr`; θ_b + λτ_m."""
    taus = [m - base for m in models]
    if not is_matrix(base):
        return mean_update(base, taus, p.lam)
    mats = [t.reshape(base.shape[0], -1) for t in taus]
    gram, target = _wudi_terms(mats)
    x = torch.stack(mats).sum(0).double()
    first, second = torch.zeros_like(x), torch.zeros_like(x)
    b1, b2, eps = 0.9, 0.999, 1e-8
    for step in range(1, int(p.steps) + 1):
        grad = 2 * (x @ gram - target)
        first.mul_(b1).add_(grad, alpha=1 - b1)
        second.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        x -= p.lr * (first / (1 - b1**step)) / ((second / (1 - b2**step)).sqrt() + eps)
    return base + p.lam * x.to(base.dtype).reshape(base.shape)
