"""Steps that change the merged task vector τ_m = θ_m − θ_b of any method that has a base:
SVC recalibrates each matrix's singular values, LiNeS scales each layer by its depth."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from weightlab.compute.svd import full_svd
from weightlab.domains import Real
from weightlab.merging.params import MAX_COEFFICIENT, Param
from weightlab.merging.subspace import is_matrix

SVC_ALPHA = Param(
    "svc_alpha",
    Real(0, MAX_COEFFICIENT, low_open=True),
    1.0,
    "SVC: floor α of each task's projection coefficient (γ_r ≤ 1/α)",
)
LINES_BETA = Param(
    "lines_beta", Real(-MAX_COEFFICIENT, MAX_COEFFICIENT), 0.5, "LiNeS: scale added at the deepest layer (β)"
)


@dataclass(frozen=True)
class Modifier:
    name: str
    formula: str
    reference: str
    params: tuple[Param, ...]


MODIFIERS: dict[str, Modifier] = {
    m.name: m
    for m in [
        Modifier(
            "svc",
            "per matrix: τ_m = UΣVᵀ, s_r^i = ⟨σ_r v_r, u_rᵀτ_i⟩/‖u_rᵀτ_i‖², σ_r ← σ_r·N/Σ_i max(α, s_r^i)",
            "Li et al. 2026, *When Shared Knowledge Hurts: Spectral Over-Accumulation in Model Merging* (SVC), §4",
            (SVC_ALPHA,),
        ),
        Modifier(
            "lines",
            "τ_m of layer ℓ scaled by α + β·ℓ/(L−1), α = ‖Σ_i τ_i‖₁ / (N‖τ_m‖₁) over the model; other tensors by α",
            "Wang et al. 2025, *LiNeS: Post-training Layer Scaling*, ICLR, §4 (multi-task merging)",
            (LINES_BETA,),
        ),
    ]
}


def calibrate(merged: torch.Tensor, taus: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """SVC (Li et al. 2026, §4): with τ_m = UΣVᵀ, the merged response along u_r is a_r = σ_r v_rᵀ and
    task i's is a_r^i = u_rᵀτ_i; s_r^i = ⟨a_r, a_r^i⟩/‖a_r^i‖² (0 where a_r^i = 0) says how much the
    merge amplifies task i there; γ_r = N / Σ_i max(α, s_r^i) and σ_r ← γ_r σ_r. Directions several
    tasks share (s_r^i > 1 in a sum) shrink; a direction one task owns keeps its scale. Other
    tensors are returned unchanged."""
    if not is_matrix(merged):
        return merged
    rows = merged.shape[0]
    svd = full_svd(merged.reshape(rows, -1))
    response = svd.S[:, None] * svd.Vh
    floor = torch.zeros_like(svd.S)
    for tau in taus:
        own = svd.U.T @ tau.reshape(rows, -1)
        norm2 = (own * own).sum(1)
        s = torch.where(
            norm2 > 0, (response * own).sum(1) / torch.where(norm2 > 0, norm2, 1.0), torch.zeros_like(norm2)
        )
        floor += s.clamp_min(alpha)
    gamma = len(taus) / floor
    return ((svd.U * (gamma * svd.S)) @ svd.Vh).reshape(merged.shape)


def lines_alpha(summed_l1: float, merged_l1: float, models: int) -> float:
    """LiNeS's α for multi-task merging (Wang et al. 2025, §4 and its code): ‖Σ_i τ_i‖₁ / (N·‖τ_m‖₁),
    so that for task arithmetic α = 1/N, the mean; 1/N when τ_m is zero."""
    return summed_l1 / (models * merged_l1) if merged_l1 > 0 else 1.0 / models


def lines_scale(layer: int | None, num_layers: int, alpha: float, beta: float) -> float:
    """α + β·ℓ/(L−1) for layer ℓ of L (Wang et al. 2025, eq. 1); α for tensors outside the layers."""
    if layer is None:
        return alpha
    return alpha + beta * layer / max(num_layers - 1, 1)
