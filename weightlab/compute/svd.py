"""SVD helpers: the thin SVD, a seeded randomized top-k, and the exact SVD of a low-rank product.

All singular values and certified top-k vectors by the Gram route are in `compute.gram`.

All functions accept a leading batch dimension ([..., m, n]), so same-shape matrices can go to
the GPU as one batched call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SVD:
    """W ≈ U diag(S) Vh, singular values descending."""

    U: torch.Tensor  # [..., m, k]
    S: torch.Tensor  # [..., k]
    Vh: torch.Tensor  # [..., k, n]

    def truncate(self, k: int) -> SVD:
        return SVD(self.U[..., :, :k], self.S[..., :k], self.Vh[..., :k, :])


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
