"""Change rates of a base matrix's singular directions under an update: the task-specific
directions of Si et al. 2024 ("Unleashing the Power of Task-Specific Directions in
Parameter Efficient Fine-tuning", §4, eq. 4), δ_i = |u_iᵀ ΔW v_i| / σ_i. Shared by `tsd` and
LoRA-Init (`init-lora --tsd`)."""

from __future__ import annotations

import torch

from weightlab.compute.deltas import adapter_factors
from weightlab.compute.device import Compute
from weightlab.io.checkpoint import Checkpoint


def core_directions(
    u: torch.Tensor, s: torch.Tensor, delta_v: torch.Tensor, delta_norm2: float, top: int
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Change rates δ_i = |u_iᵀ(ΔW V)_i|/σ_i of every core direction, the `top` largest (stable
    order), and the shares of ‖ΔW‖²_F on all core directions and on the chosen ones."""
    projection = (u * delta_v).sum(0)  # u_iᵀ ΔW v_i
    rates = projection.abs() / s.clamp_min(torch.finfo(s.dtype).tiny)
    order = torch.argsort(rates, descending=True, stable=True)[:top]
    energy = projection**2
    core = float(energy.sum()) / delta_norm2 if delta_norm2 > 0 else 0.0
    chosen = float(energy[order].sum()) / delta_norm2 if delta_norm2 > 0 else 0.0
    return rates, order, core, chosen


def delta_times_v(
    finetuned: Checkpoint, name: str, w: torch.Tensor, w_ft: torch.Tensor | None, vh: torch.Tensor, compute: Compute
) -> tuple[torch.Tensor, float]:
    """ΔW·V and ‖ΔW‖²_F for one matrix: from LoRA factors (ΔW V = s·L·(R V), no dense ΔW) when
    the fine-tune is an adapter, else from the dense difference W' − W (`w_ft` None: an adapter
    that leaves this weight unchanged, ΔW = 0)."""
    factors = adapter_factors(finetuned, name, compute)
    if factors is not None:
        left, right, scale = factors
        return scale * left @ (right @ vh.T), float(scale**2 * ((left.T @ left) * (right @ right.T)).sum())
    if w_ft is None:
        return w.new_zeros(w.shape[0], vh.shape[0]), 0.0
    delta = w_ft - w
    return delta @ vh.T, float((delta * delta).sum())
