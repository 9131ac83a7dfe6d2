"""Merging as a regression on input covariances: W = (Σ_i W_i C_i)(Σ_i C_i + P)⁻¹.

The merged matrix that best reproduces each model's outputs on its own inputs, ‖(W − W_i)X_iᵀ‖²
summed over models, solves W·Σ_i C_i = Σ_i W_i C_i with C_i = X_iᵀX_i the input covariance of
model i (weights in torch's out × in orientation). RegMean computes C_i from calibration
activations (`merging/data_aware.py`); ACE-Merging estimates it from the task vector itself
(here). One solver serves both.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from weightlab.merging.params import Generator, Params, Tensor
from weightlab.merging.subspace import is_matrix, mean_update


def solve_right(rhs: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """X with X·A = B for a symmetric positive semi-definite A (float64): by its eigendecomposition,
    eigenvalues below n·ε·λ_max treated as zero (the minimum-norm solution when A is singular)."""
    values, vectors = torch.linalg.eigh((gram + gram.mT) / 2)
    top = float(values.max()) if values.numel() else 0.0
    cutoff = max(top, 0.0) * gram.shape[0] * torch.finfo(torch.float64).eps
    inverse = torch.where(values > cutoff, 1.0 / values.clamp_min(1e-300), torch.zeros_like(values))
    solution: torch.Tensor = ((rhs @ vectors) * inverse) @ vectors.mT
    return solution


def regression_merge(
    weights: Sequence[torch.Tensor], covariances: Sequence[torch.Tensor], prior: torch.Tensor | None = None
) -> torch.Tensor:
    """argmin_W Σ_i ‖(W − W_i)C_i^½‖²_F + ‖W P^½‖²_F = (Σ_i W_i C_i)(Σ_i C_i + P)⁻¹, in float64.

    Solved around the mean W̄ of the W_i, as W̄ + (Σ_i (W_i − W̄)C_i − W̄P)(Σ_i C_i + P)⁺: the same
    matrix when Σ_i C_i + P is invertible, and W̄ along input directions no covariance reaches
    (a calibration set that spans less than the layer's width), where the minimum-norm solution
    would put zeros."""
    mats = [w.double() for w in weights]
    mean = sum(mats, torch.zeros_like(mats[0])) / len(mats)
    rhs = sum(((w - mean) @ c for w, c in zip(mats, covariances)), torch.zeros_like(mean))
    gram = sum(covariances, torch.zeros_like(covariances[0]))
    if prior is not None:
        gram, rhs = gram + prior, rhs - mean @ prior
    return mean + solve_right(rhs, gram)


def ace_terms(
    taus: Sequence[torch.Tensor], ridge: float, heterogeneity: float
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, bool]:
    """ACE-Merging's covariance estimates (Xu et al. 2026, §3): each task vector's rows, centred,
    are samples of its task's input directions, so Ĉ_t = τ̃_tᵀτ̃_t (τ̃_t: τ_t less its mean row).
    When the tasks' update energies differ (γ = Var(log ‖τ_t‖²)/mean(log ‖τ_t‖²)² above
    `heterogeneity`) each is normalised to unit trace, ε_t = ε/tr Ĉ_t, and the collective prior
    P = mean_t C_t is divided by the mean energy; else C_t = Ĉ_t, ε_t = ε, P = mean_t C_t.
    γ is the authors' measure as published: it depends on the scale of the energies (near
    ‖τ_t‖² = 1 its denominator vanishes), which real task vectors' ‖τ_t‖² ≪ 1 keep away from.
    Returns (C_t, C_t + ε_t·I, P, heterogeneous)."""
    n = taus[0].shape[1]
    eye = torch.eye(n, dtype=torch.float64, device=taus[0].device)
    energies = torch.tensor([float((t.double() ** 2).sum()) for t in taus], dtype=torch.float64)
    logs = torch.log(energies + 1e-12)
    spread = float(logs.var(unbiased=False) / (logs.mean() ** 2 + 1e-12)) if len(taus) > 1 else 0.0
    heterogeneous = spread > heterogeneity
    covariances, regularised = [], []
    for tau in taus:
        centred = tau.double() - tau.double().mean(0, keepdim=True)
        cov = centred.mT @ centred
        trace = float(cov.trace()) + 1e-12
        scale = 1 / trace if heterogeneous else 1.0
        covariances.append(cov * scale)
        regularised.append(cov * scale + (ridge * scale) * eye)
    prior = sum(covariances, torch.zeros_like(eye)) / len(taus)
    if heterogeneous:
        prior = prior / (float(energies.mean()) + 1e-12)
    return covariances, regularised, prior, heterogeneous


def ace(base: Tensor, models: Sequence[Tensor], coeffs: Tensor, p: Params, gen: Generator | None) -> Tensor:
    """ACE-Merging (Xu et al. 2026, "ACE-Merging: Data-Free Model Merging with Adaptive Covariance
    Estimation", CVPR, §3; arXiv 2603.02945), per matrix: with the covariances of `ace_terms`,
    the closed form τ_0 = (Σ_t τ_t(C_t + ε_tI))(Σ_t (C_t + ε_tI) + P)⁻¹ minimises
    Σ_t ‖(τ − τ_t)(C_t + ε_tI)^½‖² + ‖τP^½‖². Heterogeneous tasks then get the spectral
    refinement: Δ = τ_0 + Σ_t τ_t(C_t − C̄) with C̄ = mean_t (C_t + ε_tI); its top k = ⌊refine·r⌋
    singular directions, at their mean singular value σ̄_k, are added: τ_0 + σ̄_k·U_kV_kᵀ.
    θ_b + λ·that. Other tensors: θ_b + λ·mean_t τ_t, as the paper does."""
    taus = [m - base for m in models]
    if not is_matrix(base):
        return mean_update(base, taus, p.lam)
    mats = [t.reshape(base.shape[0], -1).double() for t in taus]
    covariances, regularised, prior, heterogeneous = ace_terms(mats, p.ridge, p.heterogeneity)
    merged = regression_merge(mats, regularised, prior)
    if heterogeneous:
        mean = sum(regularised, torch.zeros_like(prior)) / len(mats)
        residual = sum((t @ (c - mean) for t, c in zip(mats, covariances)), torch.zeros_like(merged))
        u, s, vh = torch.linalg.svd(merged + residual, full_matrices=False)
        k = int(s.numel() * p.refine)
        if k > 0:
            merged = merged + s[:k].mean() * (u[:, :k] @ vh[:k])
    return base + p.lam * merged.to(base.dtype).reshape(base.shape)


def ace_objective(x: torch.Tensor, taus: Sequence[torch.Tensor], ridge: float, heterogeneity: float) -> float:
    """The objective ACE's closed form minimises (before refinement), for tests."""
    _, regularised, prior, _ = ace_terms(taus, ridge, heterogeneity)
    x = x.double()
    total = sum(float(((x - t.double()) @ c * (x - t.double())).sum()) for t, c in zip(taus, regularised))
    return total + float((x @ prior * x).sum())
