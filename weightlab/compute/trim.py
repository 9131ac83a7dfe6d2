"""Keeping the largest-magnitude entries of a task vector (TIES's trim, Yadav et al. 2023, §3.1):
exactly the top `density` share, ties at the threshold to the lowest indices, a block at a time.

Shared by the merge methods (TIES, DARE-TIES, breadcrumbs) and `compare` (its sign conflict)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

TrimState = list[float] | None  # [threshold, ties left] while a task vector is trimmed by blocks; None: nothing trimmed


def kth_largest(values: torch.Tensor, k: int, sample: int = 65_536) -> torch.Tensor:
    """The k-th largest of a flat tensor, exactly, without a full selection when it is large: a
    strided sample brackets the answer, one pass counts what lies above the bracket, and the
    selection runs only on the few values inside it (falling back to a full one if the bracket
    missed)."""
    n = values.numel()
    if n <= 4 * sample:
        return torch.kthvalue(values, n - k + 1).values
    probe = values[:: n // sample].sort().values
    q = 1 - k / n
    lo = probe[max(int((q - 0.01) * probe.numel()), 0)]
    hi = probe[min(int((q + 0.01) * probe.numel()), probe.numel() - 1)]
    above = int(torch.count_nonzero(values > hi))
    inside = values[(values >= lo) & (values <= hi)]
    need = k - above
    if 0 < need <= inside.numel():
        return torch.kthvalue(inside, inside.numel() - need + 1).values
    return torch.kthvalue(values, n - k + 1).values


def trim_threshold(tau: torch.Tensor, density: float) -> tuple[float, int]:
    """(t, ties) for keeping the k = int(density·n) largest-magnitude entries of τ: the entries
    with |τ| > t and the first `ties` entries with |τ| = t in index order (so exactly k survive);
    t = inf keeps nothing."""
    k = int(density * tau.numel())
    if k == 0:
        return float("inf"), 0
    magnitude = tau.abs()
    del tau  # callers pass a temporary: let it go before the selection allocates
    return magnitude_threshold(magnitude, k)


def magnitude_threshold(magnitude: torch.Tensor, k: int) -> tuple[float, int]:
    """`trim_threshold` from |τ| itself (a caller that built it a block at a time), for k ≥ 1."""
    threshold = kth_largest(magnitude.reshape(-1), k)
    return float(threshold), k - int(torch.count_nonzero(magnitude > threshold))


def keep_top(tau: torch.Tensor, threshold: float, ties: int) -> tuple[torch.Tensor, int]:
    """τ with every entry zeroed but |τ| > threshold and the first `ties` with |τ| = threshold,
    and how many ties it kept (a chunked caller passes the rest on)."""
    magnitude = tau.abs()
    keep = magnitude > threshold
    tied = keep.new_empty(0, dtype=torch.long)
    if ties > 0:
        tied = torch.nonzero(magnitude.reshape(-1) == threshold).flatten()[:ties]
        keep.reshape(-1)[tied] = True
    return torch.where(keep, tau, 0.0), tied.numel()


def trim_top_magnitude(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k = int(density·n) largest-magnitude entries, zero the rest (TIES step 1); ties at
    the threshold go to the lowest indices, so exactly k survive."""
    if density >= 1:
        return tau
    return keep_top(tau, *trim_threshold(tau, density))[0]


def trim_state(tau: torch.Tensor, density: float) -> TrimState:
    """[threshold, ties left] for trimming τ to its top-density entries by blocks (`trim_block`);
    None at density 1 (nothing trimmed)."""
    return list(trim_threshold(tau.reshape(-1), density)) if density < 1 else None


def trim_state_of_blocks(blocks: Iterable[torch.Tensor], numel: int, density: float) -> TrimState:
    """`trim_state` of a τ of `numel` entries given as consecutive blocks (in index order),
    holding |τ| and one block, never τ whole. Every block is consumed, at density 1 too."""
    k = int(density * numel) if density < 1 else 0
    magnitude = torch.empty(0)
    offset = 0
    for block in blocks:
        if k:
            if offset == 0:
                magnitude = torch.empty(numel, dtype=block.dtype, device=block.device)
            magnitude[offset : offset + block.numel()] = block.abs().reshape(-1)
        offset += block.numel()
    if density >= 1:
        return None
    return list(magnitude_threshold(magnitude, k)) if k else [float("inf"), 0]


def trim_block(tau: torch.Tensor, trim: TrimState) -> torch.Tensor:
    """Consecutive entries of τ (in index order across calls) trimmed with `trim_state`: ties at
    the threshold go to the lowest indices, the earliest blocks, so `trim` counts them down."""
    if trim is None:
        return tau
    tau, kept = keep_top(tau, trim[0], int(trim[1]))
    trim[1] -= kept
    return tau
