"""Decompositions of a fine-tuning update ΔW = W' − W, from LoRA factors when there are some.

For an adapter, ΔW = s·L·R has rank r and its SVD comes exactly from QR of the factors
(`compute.svd.lowrank_svd`); forming and decomposing the dense m×n difference is never needed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from weightlab.compute.device import Compute
from weightlab.compute.gram import singular_values
from weightlab.compute.svd import SVD, lowrank_svd, top_svd
from weightlab.io.adapter import AdaptedCheckpoint
from weightlab.io.checkpoint import Checkpoint
from weightlab.matching import MatchedTensor


def adapter_factors(ft: Checkpoint, name: str, compute: Compute) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """(L, R, s) with ΔW = s·L·R when `ft` is an adapter that changes `name`, else None."""
    if isinstance(ft, AdaptedCheckpoint) and name in ft.module_of:
        return ft.adapter.matrix_factors(ft.module_of[name], compute.device, compute.dtype)
    return None


def delta_singular_values(
    ft: Checkpoint, items: Sequence[MatchedTensor], w: torch.Tensor, w_ft: torch.Tensor, compute: Compute
) -> torch.Tensor:
    """All min(m, n) singular values of ΔW for each batch item [b, min(m, n)] in float64, zero-padded."""
    factors = [adapter_factors(ft, item.names[0], compute) for item in items]
    lowrank = [f for f in factors if f is not None]
    if len(lowrank) < len(factors):
        return singular_values(w_ft - w)
    r = min(w.shape[-2:])
    out = torch.zeros(len(items), r, dtype=torch.float64, device=w.device)
    for b, (left, right, scale) in enumerate(lowrank):
        s = lowrank_svd(left, right, scale).S[:r]
        out[b, : s.shape[-1]] = s
    return out


def delta_top_svd(
    ft: Checkpoint,
    name: str,
    w: torch.Tensor,
    w_ft: torch.Tensor,
    k: int,
    compute: Compute,
    method: str = "exact",
    seed: int = 0,
) -> SVD:
    """Top-k SVD of one item's ΔW (2-D inputs); fewer than k triplets when ΔW has lower rank."""
    factors = adapter_factors(ft, name, compute)
    if factors is not None:
        return lowrank_svd(*factors).truncate(k)
    return top_svd(w_ft - w, k, method, seed)


def numerical_rank(s: torch.Tensor, shape: Sequence[int]) -> int:
    """Count of singular values above σ₁·max(m, n)·ε₃₂, the usual matrix-rank tolerance at float32
    precision: checkpoints are stored at that precision or coarser, so less is storage rounding
    (e.g. of a merged adapter), not a direction of the update."""
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    tol = float(s[0]) * max(shape) * max(torch.finfo(s.dtype).eps, torch.finfo(torch.float32).eps)
    return int((s > tol).sum())
