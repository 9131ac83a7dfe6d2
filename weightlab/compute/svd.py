"""One SVD helper: the cheapest exact route for what is asked, or a seeded randomized top-k.

All functions accept a leading batch dimension ([..., m, n]), so same-shape matrices can go to
the GPU as one batched call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Singular values of an m×n matrix with max(m,n) ≥ GRAM_RATIO·min(m,n) come from the
# eigenvalues of the smaller Gram matrix in float64: σ_i = √λ_i(WWᵀ). Relative error of σ_i is
# about ε₆₄·σ₁²/σ_i², far below float32 resolution for any spectrum a weight matrix has.
GRAM_RATIO = 3
SVD_METHODS = ("exact", "randomized")


@dataclass
class SVD:
    """W ≈ U diag(S) Vh, singular values descending."""

    U: torch.Tensor  # [..., m, k]
    S: torch.Tensor  # [..., k]
    Vh: torch.Tensor  # [..., k, n]

    def truncate(self, k: int) -> "SVD":
        return SVD(self.U[..., :, :k], self.S[..., :k], self.Vh[..., :k, :])


def singular_values(w: torch.Tensor) -> torch.Tensor:
    """All min(m, n) singular values, descending (svdvals, or the Gram route for very wide matrices)."""
    m, n = w.shape[-2:]
    if max(m, n) >= GRAM_RATIO * min(m, n):
        return torch.linalg.eigvalsh(gram64(w)).flip(-1).clamp_min(0).sqrt().to(w.dtype)
    return torch.linalg.svdvals(w)


def gram64(w: torch.Tensor, block: int = 4096) -> torch.Tensor:
    """The smaller Gram matrix (WWᵀ or WᵀW) in float64, accumulated over blocks of the long side
    so that no float64 copy of W is ever held."""
    tall = w.shape[-2] >= w.shape[-1]
    x = w if tall else w.mT
    side = x.shape[-1]
    gram = torch.zeros((*x.shape[:-2], side, side), dtype=torch.float64, device=w.device)
    for start in range(0, x.shape[-2], block):
        chunk = x[..., start:start + block, :].double()
        gram += chunk.mT @ chunk
    return gram


def full_svd(w: torch.Tensor) -> SVD:
    """The thin SVD (min(m, n) triplets)."""
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return SVD(u, s, vh)


def randomized_svd(w: torch.Tensor, k: int, oversample: int = 10, power_iters: int = 4, seed: int = 0) -> SVD:
    """Top-k SVD by randomized subspace iteration (Halko, Martinsson, Tropp 2011, Alg. 4.4 + 5.1).

    A seeded Gaussian test matrix Ω (n×(k+p)) gives Y = (WWᵀ)^q WΩ, re-orthonormalised by QR after
    every product; with Q = orth(Y), the SVD of the small QᵀW yields the top k triplets. The error
    bound shrinks like (σ_{k+p+1}/σ_k)^(2q+1) (ibid., Cor. 10.10); tests check it against exact.
    """
    m, n = w.shape[-2:]
    width = min(k + oversample, m, n)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn((*w.shape[:-2], n, width), generator=gen, dtype=w.dtype).to(w.device)
    q, _ = torch.linalg.qr(w @ omega)
    for _ in range(power_iters):
        z, _ = torch.linalg.qr(w.mT @ q)
        q, _ = torch.linalg.qr(w @ z)
    u_small, s, vh = torch.linalg.svd(q.mT @ w, full_matrices=False)
    return SVD(q @ u_small, s, vh).truncate(k)


def top_svd(w: torch.Tensor, k: int, method: str = "exact", seed: int = 0) -> SVD:
    """Top-k triplets, exactly (thin SVD, truncated) or by `randomized_svd`."""
    if method == "randomized" and k < min(w.shape[-2:]):
        return randomized_svd(w, k, seed=seed)
    return full_svd(w).truncate(k)


def lowrank_svd(b: torch.Tensor, a: torch.Tensor, scale: float = 1.0) -> SVD:
    """Exact SVD of scale·B·A (B m×r, A r×n) without forming it: with B = Q_b R_b and
    Aᵀ = Q_a R_a, s·BA = Q_b (s R_b R_aᵀ) Q_aᵀ, so only an r×r matrix is decomposed."""
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.mT)
    uc, s, vhc = torch.linalg.svd(scale * rb @ ra.mT)
    return SVD(qb @ uc, s, vhc @ qa.mT)
