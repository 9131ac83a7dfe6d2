"""Merge methods that work in the singular subspaces of each weight matrix's task vectors.

Each takes the tensors of one name (base θ_b, models θ_i, coefficients c_i) like every merge
method. Matrices (2-D, or conv kernels seen as out × rest) get the method; other tensors (biases,
norms) get θ_b + λ·mean_i c_i τ_i, as the papers do for non-matrix parameters.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from weightlab.compute.deltas import numerical_rank
from weightlab.compute.gram import ROW_BLOCK, add_to_gram, eigen, gram, is_tall, to_singular
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


def _scaled_task_vectors(base: Tensor, models: Sequence[Tensor], coeffs: Tensor) -> list[Tensor]:
    return [c * (m - base) for c, m in zip(coeffs.tolist(), models)]


def mean_update(base: torch.Tensor, taus: list[torch.Tensor], lam: float) -> torch.Tensor:
    return base + lam * torch.stack(taus).sum(0) / len(taus)


def tsv(base: Tensor, models: Sequence[Tensor], coeffs: Tensor, p: Params, gen: Generator | None) -> Tensor:
    """TSV-Merge (Gargiulo et al. 2025, "Task Singular Vectors", Alg. 1): keep the top 1/N of
    each c_i·τ_i's singular triplets, concatenate them, replace the stacked U and V by their
    nearest orthogonal matrices, and add λ·U⊥ΣV⊥ᵀ."""
    taus = _scaled_task_vectors(base, models, coeffs)
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
        return mean_update(base, _scaled_task_vectors(base, models, coeffs), p.lam)
    delta = _weighted_sum(base, models, coeffs).reshape(base.shape[0], -1)
    shape = (delta.shape[0], delta.shape[1])
    iso = isotropic_map(gram(delta), shape).to(delta.dtype)
    flat = delta @ iso if is_tall(delta) else iso @ delta
    return base + p.lam * flat.reshape(base.shape)


def _weighted_sum(base: Tensor, models: Sequence[Tensor], coeffs: Tensor) -> Tensor:
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
        g = add_to_gram(g, _weighted_sum(blocks[0], blocks[1:], coeffs))
    assert g is not None
    return isotropic_map(g, (rows.shape[0], rows.shape[1]))


def iso_c_block(base: Tensor, models: list[Tensor], coeffs: Tensor, p: Params, iso: torch.Tensor) -> Tensor:
    """Iso-C on a block of rows of a tall matrix, with the map `iso_c_map` made of the whole."""
    return base + p.lam * (_weighted_sum(base, models, coeffs) @ iso.to(base.dtype))


def iso_cts(base: Tensor, models: Sequence[Tensor], coeffs: Tensor, p: Params, gen: Generator | None) -> Tensor:
    """Iso-CTS (Marczak et al. 2025, §4.2, Alg. 1): each task keeps s = round((r − ⌊common·r⌋)/N)
    directions and the common subspace the remaining k = r − N·s, so that the total is r (as the
    authors' code does); the top k singular vectors of Σ_i c_i τ_i span the common subspace; each
    task adds its top s singular vectors after the common left subspace is projected out of it
    (τ_i − U_kU_kᵀτ_i); the stacked U and V are orthogonalised (nearest orthogonal matrices) and
    the spectrum made flat at the mean of the stacked singular values; θ_b + λ·σ̄·U⊥V⊥ᵀ.

    Every decomposition goes through the smaller Gram matrix in float64 (`top_triplets`, and the
    polar factor X(XᵀX)^-½ for the nearest orthogonal matrix): a residual τ_i − U_kU_kᵀτ_i has
    r − k zero singular values, on which a float32 SVD (gesdd) can fail to converge (it did on
    a 4096² matrix); an eigensolver does not. A large tall matrix is merged a block of rows at a
    time (`iso_cts_map`, `iso_cts_block`)."""
    if not is_matrix(base):
        return mean_update(base, _scaled_task_vectors(base, models, coeffs), p.lam)
    shape = (base.shape[0], base[0].numel())
    k, s = iso_cts_split(min(shape), len(models), p.common)
    common = top_triplets(_weighted_sum(base, models, coeffs).reshape(shape), k, shape)
    us, sigmas, vs = [common.U], [common.S], [common.Vh.mT]
    for c, tau in zip(coeffs.tolist(), task_vectors(base, models)):  # one task at a time
        residual = tau.reshape(shape).double().mul_(c)
        residual.addmm_(common.U, common.U.mT @ residual, alpha=-1)  # τ_i − U_kU_kᵀτ_i, in place
        specific = top_triplets(residual, s, shape)
        del residual
        us.append(specific.U)
        sigmas.append(specific.S)
        vs.append(specific.Vh.mT)
    sigma = torch.cat(sigmas)
    if sigma.numel() == 0:
        return base.clone()
    flat = polar(torch.cat(us, 1), shape) @ polar(torch.cat(vs, 1), shape).mT.mul_(sigma.mean() * p.lam)
    return base + flat.to(base.dtype).reshape(base.shape)


def top_triplets(x: torch.Tensor, k: int, shape: tuple[int, int]) -> SVD:
    """x's top k singular triplets in float64 from its smaller Gram matrix: the eigenvectors are
    one side, x·e/σ the other. A direction whose σ is below the numerical rank's tolerance for a
    matrix of `shape` gets a zero vector on the other side: left out, not invented."""
    lam, e = eigen(gram(x))
    every = to_singular(lam)
    sv, e = every[:k], e[:, :k]
    inverse = _inverse(sv, float(every[0]) if every.numel() else 0.0, shape)
    if is_tall(x):
        return SVD(x.double() @ (e * inverse), sv, e.mT)
    return SVD(e, sv, (x.double().mT @ (e * inverse)).mT)


def polar(x: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The nearest (partial) isometry to a p×q x with p ≥ q: x(xᵀx)^-½ over xᵀx's numerical range
    (Higham 2008, §8.1), float64."""
    g = None
    for start in range(0, x.shape[0], ROW_BLOCK):  # xᵀx without a float64 copy of x
        g = add_to_gram(g, x[start : start + ROW_BLOCK])
    assert g is not None
    return x.double() @ _inverse_root(g, shape)


def iso_cts_split(r: int, tasks: int, common: float) -> tuple[int, int]:
    """(k, s): the common subspace's k = r − N·s directions and each task's s."""
    s = round((r - int(r * common)) / tasks)
    s = s if tasks * s <= r else r // tasks
    return r - tasks * s, s


@dataclass
class IsoCtsMap:
    """What Iso-CTS's blocks of rows need of a whole tall matrix (`iso_cts_map`), in float64.
    From a block's rows of Δ = Σ M_i (M_i = c_i τ_i), its rows of U_cat = [U_k, U_1, …, U_N]
    are U_k = Δ·common and U_i = M_i·specific_i − U_k·through_i (`stacked_left`)."""

    common: torch.Tensor  # V_kΣ_k⁻¹ [n, k]
    specific: list[torch.Tensor]  # W_iρ_i⁻¹ [n, s]: task i's top directions outside the common ones
    through: list[torch.Tensor]  # U_kᵀM_i·W_iρ_i⁻¹ [k, s]: what of them the projection removes
    flat: torch.Tensor  # σ̄·(U_catᵀU_cat)^-½·polar(V_cat)ᵀ [r, n]: U_cat·flat = σ̄·U⊥V⊥ᵀ


def stacked_left(delta: torch.Tensor, mats: list[torch.Tensor], m: IsoCtsMap) -> torch.Tensor:
    """A block's rows of U_cat (`IsoCtsMap`)."""
    u_k = delta @ m.common
    return torch.cat([u_k, *(x @ w - u_k @ c for x, w, c in zip(mats, m.specific, m.through))], 1)


def _task_matrices(base: Tensor, models: Sequence[Tensor], coeffs: Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Δ = Σ M_i and the M_i = c_i τ_i of a block of rows, in float64."""
    mats = [c * (m.double() - base.double()) for c, m in zip(coeffs.tolist(), models)]
    delta = mats[0].clone()
    for x in mats[1:]:
        delta.add_(x)
    return delta, mats


def _inverse(s: torch.Tensor, largest: float, shape: tuple[int, int]) -> torch.Tensor:
    """1/σ, and 0 where σ is below the numerical rank's tolerance (`numerical_rank`): a direction of
    zero singular value, which an SVD picks arbitrarily, is left out instead of invented."""
    tol = largest * max(shape) * torch.finfo(torch.float32).eps
    return torch.where(s > tol, 1 / s.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(s))


def _inverse_root(g: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """G^-½ of a Gram matrix (lower triangle read) over its numerical range: X·G^-½ is the nearest
    (partial) isometry to X for G = XᵀX, X's polar factor (Higham 2008, §8.1)."""
    lam, vec = eigen(g)
    s = to_singular(lam)
    return (vec * _inverse(s, float(s[0]) if s.numel() else 0.0, shape)) @ vec.mT


def iso_cts_map(rows: RowReader, coeffs: Tensor, p: Params) -> IsoCtsMap:
    """`iso_cts` of a tall m×n matrix read a block of rows at a time, with Gram matrices (n×n,
    float64) instead of SVDs, in three passes over the blocks: ΔᵀΔ gives V_k and Σ_k (U_k =
    ΔV_kΣ_k⁻¹); M_iᵀM_i and C_i = U_kᵀM_i give the Gram matrix of task i's residual
    (M_i − U_kC_i)ᵀ(M_i − U_kC_i) = M_iᵀM_i − C_iᵀC_i, whose top s eigenvectors W_i and values ρ_i²
    are its top right singular vectors and values (U_i = (M_i − U_kC_i)W_iρ_i⁻¹); U_catᵀU_cat
    gives U_cat's nearest orthogonal matrix as U_cat(U_catᵀU_cat)^-½ (its polar factor), and V_cat
    (n×r) its own the same way. Memory: about 2N + 3 matrices of n×n in float64 besides blocks."""
    m, n = rows.shape[0], rows.shape[1]
    shape, tasks = (m, n), rows.inputs - 1
    k, s = iso_cts_split(n, tasks, p.common)

    def task_blocks() -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
        for blocks in rows.all_blocks():
            yield _task_matrices(blocks[0], blocks[1:], coeffs)

    g = None
    for delta, _ in task_blocks():
        g = add_to_gram(g, delta)
    assert g is not None
    lam, vec = eigen(g)
    every = to_singular(lam)
    largest = float(every[0])
    v_k, sigmas = vec[:, :k].clone(), [every[:k]]
    del g, vec
    common = v_k * _inverse(every[:k], largest, shape)
    grams: list[torch.Tensor | None] = [None] * tasks
    shared = [torch.zeros(k, n, dtype=torch.float64, device=v_k.device) for _ in range(tasks)]
    for delta, mats in task_blocks():
        u_k = delta @ common
        for i, x in enumerate(mats):
            grams[i] = add_to_gram(grams[i], x)
            shared[i].addmm_(u_k.mT, x)
    vs, specific, through = [v_k], [], []
    for i, c in enumerate(shared):
        residual = grams[i]
        assert residual is not None
        grams[i] = None
        lam_i, vec_i = eigen(residual.sub_(c.mT @ c))  # the lower triangle is what is read
        rho = to_singular(lam_i[:s])
        vs.append(vec_i[:, :s].clone())
        specific.append(vs[-1] * _inverse(rho, largest, shape))
        through.append(c @ specific[-1])
        sigmas.append(rho)
    del shared
    blocks_map = IsoCtsMap(common, specific, through, torch.empty(0))
    q = None
    for delta, mats in task_blocks():
        q = add_to_gram(q, stacked_left(delta, mats, blocks_map))
    sigma = torch.cat(sigmas)
    if q is None or sigma.numel() == 0:
        return IsoCtsMap(common, specific, through, torch.zeros(sigma.numel(), n, dtype=torch.float64))
    flat = sigma.mean() * _inverse_root(q, shape) @ polar(torch.cat(vs, 1), shape).mT
    return IsoCtsMap(common, specific, through, flat)


def iso_cts_block(base: Tensor, models: list[Tensor], coeffs: Tensor, p: Params, iso: IsoCtsMap) -> Tensor:
    """Iso-CTS on a block of rows of a tall matrix, with `iso_cts_map` made of the whole."""
    delta, mats = _task_matrices(base, models, coeffs)
    return base + p.lam * (stacked_left(delta, mats, iso) @ iso.flat).to(base.dtype)


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
