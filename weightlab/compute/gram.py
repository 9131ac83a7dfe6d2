"""Spectra through the smaller Gram matrix in float64: all singular values for the price of one
symmetric eigenvalue problem, and certified top-k singular vectors without an SVD.

W (m×n, r = min(m, n)) has the Gram matrix G = WᵀW when m ≥ n ("tall") or WWᵀ when m < n, of
size r×r, with eigenvalues λ_i = σ_i² and eigenvectors the right (tall) or left (wide) singular
vectors of W. G is accumulated in float64 from the stored entries (products of float32 numbers
are exact in float64) and handed to a backward-stable symmetric eigensolver (LAPACK syevd). On
two cores this costs about a quarter of a float32 SVD with vectors, and it is more accurate:

- values (Weyl's inequality with a backward error of c·ε₆₄‖G‖; Golub & Van Loan 2013, §8.1.2):
  |λ̂_i − λ_i| ≤ c·ε₆₄·σ₁², so |σ̂_i − σ_i|/σ_i ≤ c·ε₆₄·(σ₁/σ_i)²/2, below float32 resolution
  (ε₃₂ = 1.2e-7) for every σ_i ≥ 1e-4·σ₁, where a float32 SVD is good to c·ε₃₂·σ₁/σ_i;
- vectors (Davis & Kahan 1970): sin∠(ê_i, e_i) ≤ c·ε₆₄·σ₁²/gap_i, gap_i = min_j≠i |λ_i − λ_j|.

`top_eigen` gets all eigenvalues and the top k eigenvectors from one tridiagonal reduction
(LAPACK sytrd; sterf for the values; MRRR stemr for the k wanted vectors of the tridiagonal
matrix, Dhillon & Parlett 2004; back-transformed by ormqr with sytrd's reflectors): an exact,
deterministic method that costs about as much as the eigenvalues alone, where the full
eigensolver with vectors costs three times that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg
import torch

from weightlab.compute.svd import SVD

ROW_BLOCK = 4096  # rows of W converted to float64 at a time


@dataclass
class GramSpectrum:
    """All singular values of W and, when asked for, every eigenvector of its smaller Gram matrix."""

    S: torch.Tensor  # [r] float64, descending
    E: torch.Tensor | None  # [r, c] float32 (as cached), column i for S[i]: right (tall) or left (wide) vectors
    tall: bool

    @property
    def vectors(self) -> torch.Tensor:
        """E, for a decomposition made with vectors."""
        assert self.E is not None, "a decomposition of values alone"
        return self.E


def is_tall(w: torch.Tensor) -> bool:
    """More rows than columns: the Gram matrix is WᵀW (right vectors); else WWᵀ (left vectors)."""
    return w.shape[-2] > w.shape[-1]


def gram(w: torch.Tensor) -> torch.Tensor:
    """The smaller Gram matrix of a 2-D W in float64, accumulated over row blocks so that no
    float64 copy of W is held; BLAS syrk on the CPU (half the flops of a matmul). Only the lower
    triangle is to be read (what every eigensolver here reads): mirroring it would cost more
    than the product."""
    return column_gram(w if is_tall(w) else w.mT)


def column_gram(x: torch.Tensor, rows: int = ROW_BLOCK) -> torch.Tensor:
    """XᵀX of a 2-D X in float64 (lower triangle only, as `gram`), `rows` rows converted at a time."""
    g = None
    for start in range(0, x.shape[0], rows):
        g = add_to_gram(g, x[start : start + rows])
    return g if g is not None else torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float64, device=x.device)


def add_to_gram(g: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
    """G + XᵀX for a block X of rows (G = 0 when None), in float64, lower triangle only (`gram`);
    updated in place where it can be. A Gram matrix summed over the row blocks of a tall W is WᵀW."""
    side = rows.shape[-1]
    if rows.device.type != "cpu":
        g = torch.zeros(side, side, dtype=torch.float64, device=rows.device) if g is None else g
        chunk = rows.double()
        return g.addmm_(chunk.mT, chunk)
    lower: Any = np.zeros((side, side), dtype=np.float64, order="F") if g is None else g.numpy()
    block: Any = rows.detach().numpy().astype(np.float64)  # keeps the memory order
    # syrk wants column-major: a C-ordered block is its transpose in column-major, no copy
    a, trans = (block.T, 0) if block.flags.c_contiguous else (np.asfortranarray(block), 1)
    lower = scipy.linalg.blas.dsyrk(1.0, a, beta=1.0, c=lower, trans=trans, lower=1, overwrite_c=1)
    return torch.from_numpy(lower)  # column-major, as LAPACK wants it


def eigenvalues(g: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a symmetric float64 matrix, descending (LAPACK syevd; scipy's is faster on CPUs)."""
    if g.device.type == "cpu":
        lam = torch.from_numpy(scipy.linalg.eigvalsh(g.numpy(), lower=True, driver="evd", check_finite=False))
    else:
        lam = torch.linalg.eigvalsh(g)
    return lam.flip(-1)


def eigen(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending) and eigenvectors (columns in the same order) of a symmetric float64 matrix."""
    if g.device.type == "cpu":
        lam, vec = (
            torch.from_numpy(a) for a in scipy.linalg.eigh(g.numpy(), lower=True, driver="evd", check_finite=False)
        )
    else:
        lam, vec = torch.linalg.eigh(g)
    return lam.flip(-1), vec.flip(-1)


def to_singular(lam: torch.Tensor) -> torch.Tensor:
    """σ_i = √max(λ_i, 0): rounding can leave a zero eigenvalue slightly negative."""
    return lam.clamp_min(0).sqrt()


def singular_values(w: torch.Tensor) -> torch.Tensor:
    """All min(m, n) singular values of W [..., m, n] in float64, descending, by the Gram route."""
    flat = w.reshape(-1, *w.shape[-2:])
    return torch.stack([to_singular(eigenvalues(gram(m))) for m in flat]).reshape(*w.shape[:-2], -1)


def decompose(w: torch.Tensor, columns: int | None = None) -> GramSpectrum:
    """Every singular value of a 2-D W and the top `columns` eigenvectors of its Gram matrix (all
    when None, none when 0), rounded to float32 as stored in the cache, so that a cold and a warm
    run give the same bytes."""
    if columns == 0:
        return GramSpectrum(singular_values(w), None, is_tall(w))
    g = gram(w)
    lam, vec = eigen(g) if columns is None or columns >= g.shape[-1] else top_eigen(g, columns)
    # contiguous, exactly as read back from the cache: the same memory layout takes the same BLAS path
    return GramSpectrum(to_singular(lam).contiguous(), vec.float().cpu().contiguous(), is_tall(w))


def top_eigen(g: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All eigenvalues (descending) and the top k eigenvectors [r, k] of a symmetric float64 matrix."""
    r = g.shape[-1]
    k = min(k, r)
    if g.device.type != "cpu" or r < 3:
        lam, vec = eigen(g)
        return lam, vec[:, :k]
    lapack = scipy.linalg.lapack
    work = int(lapack.dsytrd_lwork(r, lower=1)[0])
    reflectors, diagonal, off, tau, _ = lapack.dsytrd(g.numpy(), lower=1, lwork=work)
    lam = lapack.dsterf(diagonal, off)[0]
    _, z = scipy.linalg.eigh_tridiagonal(diagonal, off, select="i", select_range=(r - k, r - 1))
    # sytrd (lower) leaves Q = H(1)…H(r−1) as the QR-style reflectors of A[1:, :r−1]
    a, rows = reflectors[1:, : r - 1], z[1:]
    work = int(lapack.dormqr("L", "N", a, tau, rows, lwork=-1)[1][0])
    z[1:] = lapack.dormqr("L", "N", a, tau, rows, lwork=max(work, 1))[0]
    return torch.from_numpy(np.sort(lam)[::-1].copy()), torch.from_numpy(np.ascontiguousarray(z[:, ::-1]))


def top_singular(w: torch.Tensor, k: int) -> tuple[torch.Tensor, SVD]:
    """Every singular value of a 2-D W (float64, descending) and its top k singular triplets, from
    one Gram matrix and one tridiagonal reduction (`top_eigen`)."""
    lam, vectors = top_eigen(gram(w), k)
    return triplets(w, GramSpectrum(to_singular(lam), vectors, is_tall(w)))


def triplets(w: torch.Tensor, spectrum: GramSpectrum) -> tuple[torch.Tensor, SVD]:
    """Every singular value of a 2-D W and the singular triplets of the Gram eigenvectors in
    `spectrum` (W's decomposition): the other side of each pair is W·e/σ (exact in float64 for
    the top σ). A W whose last such σ is zero has no unique pairs: the thin SVD decides."""
    every, vectors = spectrum.S, spectrum.vectors
    s = every[: vectors.shape[-1]]
    if s.numel() == 0 or float(s[-1]) <= float(s[0]) * 1e-6:
        u, sv, vh = torch.linalg.svd(w.double(), full_matrices=False)
        return every, SVD(u[:, : s.numel()], sv[: s.numel()], vh[: s.numel()])
    e = vectors.to(w.device, torch.float64)
    if spectrum.tall:
        return every, SVD(w.double() @ e / s, s, e.mT)
    return every, SVD(e, s, (w.double().mT @ e / s).mT)
