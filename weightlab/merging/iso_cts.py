"""Iso-CTS (Marczak et al. 2025, "No Task Left Behind: Isotropic Model Merging with Common and
Task-Specific Subspaces", §4.2, Alg. 1), a block of rows at a time.

With M_i = c_i τ_i (m × n), Δ = Σ_i M_i and r = min(m, n), each task keeps
s = round((r − ⌊common·r⌋)/N) directions and the common subspace the remaining k = r − N·s (as the
authors' code does). The top k singular vectors U_k, V_k of Δ span the common subspace; each task
adds the top s singular triplets of its residual R_i = M_i − U_kU_kᵀM_i; U_cat = [U_k, U_1, …, U_N]
and V_cat are replaced by their nearest orthogonal matrices and the spectrum is made flat at the
mean σ̄ of the stacked singular values: θ_b + λ·σ̄·polar(U_cat)·polar(V_cat)ᵀ.

Every decomposition is an eigenproblem of a Gram matrix in float64 (a residual has r − k zero
singular values, on which a float32 SVD failed to converge at 4096²; an eigensolver does not),
and the matrix is read a block of rows at a time (a whole tensor is one block), so memory holds
m × m or n × n matrices, never a float64 copy of the tensor:

- wide or square (m ≤ n): ΔΔᵀ = UΣ²Uᵀ (Δ gathered in float32) gives U_k and the rest U_⊥ of an
  orthonormal basis, so that R_i = U_⊥U_⊥ᵀM_i; V_k = ΔᵀU_kΣ_k⁻¹ and Y_i = U_⊥ᵀM_i are sums over
  blocks; Y_iY_iᵀ = zρ²zᵀ gives R_i's top left vectors U_⊥z, values ρ and right vectors Y_iᵀzρ⁻¹.
- tall (m > n): ΔᵀΔ gives V_k and Σ_k (U_k = ΔV_kΣ_k⁻¹); M_iᵀM_i and C_i = U_kᵀM_i give
  R_iᵀR_i = M_iᵀM_i − C_iᵀC_i (one task a pass), whose top eigenpairs are W_i and ρ²
  (U_i = R_iW_iρ⁻¹); U_catᵀU_cat is summed over the blocks of U_cat's rows, which the merge
  makes again.

polar(X) = X(XᵀX)^-½ over XᵀX's numerical range (Higham 2008, "Functions of Matrices", §8.1). A
direction whose singular value is below the numerical rank's tolerance has both its vectors set
to zero: left out, not picked arbitrarily as an SVD would.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from weightlab.compute.deltas import rank_tolerance
from weightlab.compute.gram import add_to_gram, column_gram, eigen, gram, to_singular
from weightlab.compute.rows import RowReader
from weightlab.merging.params import Generator, Params, Tensor
from weightlab.merging.subspace import is_matrix, mean_update, scaled_task_vectors, weighted_sum
from weightlab.merging.task_vectors import task_vectors

CHUNK = 512  # rows converted to float64 at a time


@dataclass
class TallParts:
    """A tall matrix's rows of U_cat from a block's Δ and M_i (`stacked_left`)."""

    common: torch.Tensor  # V_kΣ_k⁻¹ [n, k]: U_k = Δ·common
    specific: list[torch.Tensor]  # W_iρ_i⁻¹ [n, s]
    through: list[torch.Tensor]  # C_iW_iρ_i⁻¹ [k, s]: U_i = M_i·specific_i − U_k·through_i


@dataclass
class IsoCtsMap:
    """What the blocks need of the whole matrix (`iso_cts_map`): a block's rows of σ̄·U⊥V⊥ᵀ are
    its rows of `left` (wide) or of U_cat (tall: `stacked_left`), times `right`."""

    spans: Iterator[tuple[int, int]]  # the blocks' rows, in the order the executor merges them
    right: torch.Tensor  # [r, n] float64
    left: torch.Tensor | None = None  # wide: σ̄·polar(U_cat)·(V_catᵀV_cat)^-½ [m, r]
    tall: TallParts | None = None


def iso_cts(base: Tensor, models: Sequence[Tensor], coeffs: Tensor, p: Params, gen: Generator | None) -> Tensor:
    """Iso-CTS (Marczak et al. 2025, §4.2, Alg. 1; the module docstring) of one tensor held whole:
    the block route (`iso_cts_map`) with one block. Matrices get the method; other tensors
    θ_b + λ·mean_i c_iτ_i."""
    if not is_matrix(base):
        return mean_update(base, scaled_task_vectors(base, models, coeffs), p.lam)
    shape = (base.shape[0], base[0].numel())
    inputs = [t.reshape(shape) for t in (base, *models)]
    rows = RowReader(lambda i, start, stop: inputs[i][start:stop], shape, [(0, shape[0])], len(inputs))
    return iso_cts_block(inputs[0], inputs[1:], coeffs, p, iso_cts_map(rows, coeffs, p)).reshape(base.shape)


def iso_cts_split(r: int, tasks: int, common: float) -> tuple[int, int]:
    """(k, s): the common subspace's k = r − N·s directions and each task's s."""
    s = round((r - int(r * common)) / tasks)
    s = s if tasks * s <= r else r // tasks
    return r - tasks * s, s


def iso_cts_map(rows: RowReader, coeffs: Tensor, p: Params) -> IsoCtsMap:
    """σ̄·U⊥V⊥ᵀ of a matrix read a block of rows at a time, as factors (module docstring)."""
    m, n = rows.shape[0], rows.shape[1]
    return (_tall_map if m > n else _wide_map)(rows, coeffs, p.common)


def iso_cts_block(base: Tensor, models: Sequence[Tensor], coeffs: Tensor, p: Params, iso: IsoCtsMap) -> Tensor:
    """Iso-CTS on the next block of rows, with `iso_cts_map` made of the whole matrix (CHUNK rows
    at a time in float64)."""
    start, _ = next(iso.spans)
    out = torch.empty_like(base)
    for a in range(0, base.shape[0], CHUNK):
        b = min(a + CHUNK, base.shape[0])
        if iso.tall is not None:
            left = stacked_left(*_task_matrices(base[a:b], [m[a:b] for m in models], coeffs), iso.tall)
        else:
            assert iso.left is not None
            left = iso.left[start + a : start + b]
        out[a:b] = base[a:b] + (left @ iso.right).mul_(p.lam)
    return out


def _wide_map(rows: RowReader, coeffs: Tensor, common: float) -> IsoCtsMap:
    m, n = shape = rows.shape[0], rows.shape[1]
    k, s = iso_cts_split(m, rows.inputs - 1, common)
    delta = None
    for (start, stop), blocks in zip(rows.spans, rows.all_blocks()):
        part = weighted_sum(blocks[0], blocks[1:], coeffs)
        delta = torch.empty(shape, dtype=part.dtype, device=part.device) if delta is None else delta
        delta[start:stop] = part
    assert delta is not None
    lam, u = eigen(gram(delta))  # ΔΔᵀ
    every = to_singular(lam)
    largest = float(every[0])
    u_k, u_rest = u[:, :k] * _kept(every[:k], largest, shape), u[:, k:]
    v_cat = torch.zeros(n, m, dtype=torch.float64, device=u.device)  # V_cat, r = m columns
    _transposed_product(delta, u_k * _inverse(every[:k], largest, shape), v_cat[:, :k])  # V_k = ΔᵀU_kΣ_k⁻¹
    del delta
    ys = [torch.zeros(m - k, n, dtype=torch.float64, device=u.device) for _ in coeffs.tolist()]
    for (start, stop), blocks in zip(rows.spans, rows.all_blocks()):
        for c, y, tau in zip(coeffs.tolist(), ys, task_vectors(blocks[0], blocks[1:])):
            y.addmm_(u_rest[start:stop].mT, tau.double(), alpha=c)
    us, sigmas = [u_k], [every[:k]]
    for i in range(len(ys)):
        y = ys.pop(0)  # each freed once used
        lam_y, z = eigen(gram(y)) if s else (lam[:0], u_rest[:0, :0])  # YYᵀ
        rho, z = to_singular(lam_y[:s]), z[:, :s]
        us.append(u_rest @ z * _kept(rho, largest, shape))
        v_cat[:, k + i * s : k + (i + 1) * s] = y.mT @ (z * _inverse(rho, largest, shape))
        sigmas.append(rho)
        del y
    left = polar(torch.cat(us, 1), shape) @ _inverse_root(column_gram(v_cat, CHUNK), shape) * _mean(torch.cat(sigmas))
    return IsoCtsMap(iter(rows.spans), v_cat.mT, left=left)


def _tall_map(rows: RowReader, coeffs: Tensor, common: float) -> IsoCtsMap:
    shape = (rows.shape[0], rows.shape[1])
    n, tasks = shape[1], rows.inputs - 1
    k, s = iso_cts_split(n, tasks, common)

    def chunks() -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
        """Δ and the M_i of every block of rows, CHUNK rows at a time, in float64."""
        for blocks in rows.all_blocks():
            for a in range(0, blocks[0].shape[0], CHUNK):
                yield _task_matrices(blocks[0][a : a + CHUNK], [x[a : a + CHUNK] for x in blocks[1:]], coeffs)

    g = None
    for delta, _ in chunks():
        g = add_to_gram(g, delta)
    assert g is not None
    lam, vec = eigen(g)  # ΔᵀΔ
    every = to_singular(lam)
    largest = float(every[0])
    v_k, sigmas = vec[:, :k] * _kept(every[:k], largest, shape), [every[:k]]
    del g, vec
    common_map = v_k * _inverse(every[:k], largest, shape)
    vs, specific, through = [v_k], [], []
    for i in range(tasks):  # one task a pass: two n × n matrices at a time
        gram_i, c = None, torch.zeros(k, n, dtype=torch.float64, device=v_k.device)
        for delta, mats in chunks():
            gram_i = add_to_gram(gram_i, mats[i])
            c.addmm_((delta @ common_map).mT, mats[i])
        assert gram_i is not None
        lam_i, vec_i = eigen(gram_i.sub_(c.mT @ c))  # RᵀR; the lower triangle is what is read
        del gram_i
        rho = to_singular(lam_i[:s])
        vs.append(vec_i[:, :s] * _kept(rho, largest, shape))
        specific.append(vec_i[:, :s] * _inverse(rho, largest, shape))
        through.append(c @ specific[-1])
        sigmas.append(rho)
        del c, vec_i
    parts = TallParts(common_map, specific, through)
    q = None
    for delta, mats in chunks():
        q = add_to_gram(q, stacked_left(delta, mats, parts))
    assert q is not None
    right = _inverse_root(q, shape) @ polar(torch.cat(vs, 1), shape).mT * _mean(torch.cat(sigmas))
    return IsoCtsMap(iter(rows.spans), right, tall=parts)


def stacked_left(delta: torch.Tensor, mats: list[torch.Tensor], parts: TallParts) -> torch.Tensor:
    """A block's rows of U_cat = [U_k, U_1, …, U_N] of a tall matrix (`TallParts`)."""
    u_k = delta @ parts.common
    return torch.cat([u_k, *(x @ w - u_k @ c for x, w, c in zip(mats, parts.specific, parts.through))], 1)


def _task_matrices(base: Tensor, models: Sequence[Tensor], coeffs: Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Δ = Σ M_i and the M_i = c_i τ_i of a block of rows, in float64."""
    mats = [c * (m.double() - base.double()) for c, m in zip(coeffs.tolist(), models)]
    delta = mats[0].clone()
    for x in mats[1:]:
        delta.add_(x)
    return delta, mats


def _kept(s: torch.Tensor, largest: float, shape: tuple[int, int]) -> torch.Tensor:
    """1 where σ is above the numerical rank's tolerance (`rank_tolerance`), else 0."""
    return (s > rank_tolerance(largest, shape)).to(s.dtype)


def _inverse(s: torch.Tensor, largest: float, shape: tuple[int, int]) -> torch.Tensor:
    """1/σ where σ is kept (`_kept`), else 0."""
    return _kept(s, largest, shape) / s.clamp_min(torch.finfo(torch.float64).tiny)


def _mean(sigma: torch.Tensor) -> float:
    return float(sigma.mean()) if sigma.numel() else 0.0


def _inverse_root(g: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """(XᵀX)^-½ from the Gram matrix G = XᵀX (lower triangle read), over its numerical range."""
    lam, vec = eigen(g)
    s = to_singular(lam)
    return (vec * _inverse(s, float(s[0]) if s.numel() else 0.0, shape)) @ vec.mT


def polar(x: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The nearest (partial) isometry to a p × q x with p ≥ q: x(xᵀx)^-½, in float64."""
    return x.double() @ _inverse_root(column_gram(x, CHUNK), shape)


def _transposed_product(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out += aᵀb in float64, a block of a's rows at a time: no float64 copy of a."""
    for start in range(0, a.shape[0], CHUNK):
        out.addmm_(a[start : start + CHUNK].double().mT, b[start : start + CHUNK])
    return out
