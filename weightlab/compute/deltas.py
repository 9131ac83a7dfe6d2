"""Decompositions of a fine-tuning update ΔW = W' − W, from LoRA factors when there are some.

For an adapter, ΔW = s·L·R has rank r and its SVD comes exactly from QR of the factors
(`compute.svd.lowrank_svd`); forming and decomposing the dense m×n difference is never needed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from weightlab.compute.cache import DecompositionCache
from weightlab.compute.device import Compute
from weightlab.compute.spectra import update_values
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
    return torch.stack(
        [update_singular_values(ft, item.names[0], w[b], w_ft[b], compute) for b, item in enumerate(items)]
    )


def update_singular_values(
    ft: Checkpoint,
    name: str,
    w: torch.Tensor,
    w_ft: torch.Tensor,
    compute: Compute,
    cache: DecompositionCache | None = None,
    digests: tuple[str, str] | None = None,
) -> torch.Tensor:
    """All min(m, n) singular values of one matrix's ΔW in float64, zero-padded: from the
    adapter's factors when `ft` is one that changes `name`, else of the dense difference (read
    from `cache` when it has them; `digests` are W's and W''s, when the caller has them)."""
    factors = adapter_factors(ft, name, compute)
    if factors is None:
        return update_values(w, w_ft, cache, digests)
    out = torch.zeros(min(w.shape), dtype=torch.float64, device=w.device)
    s = lowrank_svd(*factors).S[: out.shape[-1]]
    out[: s.shape[-1]] = s
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
    return int((s > rank_tolerance(float(s[0]), shape, s.dtype)).sum())


def rank_tolerance(largest: float, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> float:
    """σ₁·max(m, n)·ε (ε of `dtype`, at least float32's): below it, a singular value of an m × n
    matrix is rounding (`numerical_rank`)."""
    return largest * max(shape) * max(torch.finfo(dtype).eps, torch.finfo(torch.float32).eps)
