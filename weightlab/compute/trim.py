"""Keeping the largest-magnitude entries of a task vector (TIES's trim, Yadav et al. 2023, §3.1):
exactly the top `density` share, ties at the threshold to the lowest indices, a block at a time.

Shared by the merge methods (TIES, DARE-TIES, breadcrumbs) and `compare` (its sign conflict)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from weightlab.compute.scratch import buffer

TrimState = list[float] | None  # [threshold, ties left] while a task vector is trimmed by blocks; None: nothing trimmed


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest of a flat tensor, exactly (`kth_largest_and_above`)."""
    return kth_largest_and_above(values, k)[0]


def kth_largest_and_above(values: torch.Tensor, k: int, sample: int = 65_536) -> tuple[torch.Tensor, int]:
    """The k-th largest v of a flat tensor, exactly, and how many values exceed it, without a full
    selection when it is large: a strided sample brackets v, one pass counts what lies above the
    bracket, and the selection runs only on the few values inside it (falling back to a full one
    if the bracket missed)."""
    n = values.numel()
    if n > 4 * sample:
        probe = values[:: n // sample].sort().values
        q = 1 - k / n
        lo = float(probe[max(int((q - 0.01) * probe.numel()), 0)])
        hi = float(probe[min(int((q + 0.01) * probe.numel()), probe.numel() - 1)])
        mask, below_hi = (buffer(role, values.shape, torch.bool, values.device) for role in ("trim.mask", "trim.mask2"))
        above = int(torch.count_nonzero(torch.gt(values, hi, out=mask)))
        inside = values[torch.ge(values, lo, out=mask).logical_and_(torch.le(values, hi, out=below_hi))]
        need = k - above
        if 0 < need <= inside.numel():
            kth = torch.kthvalue(inside, inside.numel() - need + 1).values
            return kth, above + int(torch.count_nonzero(inside > kth))
    kth = torch.kthvalue(values, n - k + 1).values
    return kth, int(torch.count_nonzero(values > kth))


def kept_count(density: float, numel: int) -> int:
    """How many entries TIES keeps of n: int(density·n), at least one of a non-empty tensor at a
    positive density (mergekit's rule: a tensor smaller than 1/density keeps its largest entry)."""
    return numel if density >= 1 else max(1, int(density * numel)) if numel else 0


def trim_threshold(tau: torch.Tensor, density: float) -> tuple[float, int]:
    """(t, ties) for keeping the k = `kept_count` largest-magnitude entries of τ: the entries
    with |τ| > t and the first `ties` entries with |τ| = t in index order (so exactly k survive);
    t = inf keeps nothing."""
    k = kept_count(density, tau.numel())
    if k == 0:
        return float("inf"), 0
    magnitude = tau.abs()
    del tau  # callers pass a temporary: let it go before the selection allocates
    return magnitude_threshold(magnitude, k)


def magnitude_threshold(magnitude: torch.Tensor, k: int) -> tuple[float, int]:
    """`trim_threshold` from |τ| itself (a caller that built it a block at a time), for k ≥ 1."""
    threshold, above = kth_largest_and_above(magnitude.reshape(-1), k)
    return float(threshold), k - above


def keep_top_(tau: torch.Tensor, threshold: float, ties: int) -> int:
    """Zero τ (contiguous) in place but where |τ| > threshold (a hard shrinkage, one pass) and at
    the first `ties` entries with |τ| = threshold; how many ties it kept (a chunked caller passes
    the rest on)."""
    flat = tau.view(-1)
    tied = first_ties(flat, threshold, ties)
    kept = flat[tied]
    torch.hardshrink(tau, threshold, out=tau)
    flat[tied] = kept
    return tied.numel()


def first_ties(flat: torch.Tensor, threshold: float, ties: int, chunk: int = 1 << 20) -> torch.Tensor:
    """The indices of the first `ties` entries with |x| = threshold (fewer if there are not so
    many), searched a chunk at a time: ties are dense at a threshold of rounded values, so the
    first chunk usually holds them all."""
    found: list[torch.Tensor] = [flat.new_empty(0, dtype=torch.long)]
    count = 0
    for start in range(0, flat.numel() if ties > 0 else 0, chunk):
        part = flat[start : start + chunk]
        magnitude = torch.abs(part, out=buffer("trim.tie-search", part.shape, part.dtype, part.device))
        equal = torch.eq(magnitude, threshold, out=buffer("trim.tie-mask", part.shape, torch.bool, part.device))
        where = torch.nonzero(equal).flatten()[: ties - count]
        found.append(where + start)
        count += where.numel()
        if count == ties:
            break
    return torch.cat(found)


def trim_top_magnitude(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k = `kept_count` largest-magnitude entries, zero the rest (TIES step 1); ties at
    the threshold go to the lowest indices, so exactly k survive."""
    if density >= 1:
        return tau
    trimmed = tau.clone()
    keep_top_(trimmed, *trim_threshold(tau, density))
    return trimmed


def trim_state(tau: torch.Tensor, density: float) -> TrimState:
    """[threshold, ties left] for trimming τ to its top-density entries by blocks (`trim_block`);
    None at density 1 (nothing trimmed)."""
    return list(trim_threshold(tau.reshape(-1), density)) if density < 1 else None


def trim_state_of_blocks(blocks: Iterable[torch.Tensor], numel: int, density: float) -> TrimState:
    """`trim_state` of a τ of `numel` entries given as consecutive blocks (in index order),
    holding |τ| and one block, never τ whole. Every block is consumed, at density 1 too."""
    k = kept_count(density, numel) if density < 1 else 0
    magnitude = torch.empty(0)
    offset = 0
    for block in blocks:
        if k:
            if offset == 0:
                magnitude = buffer("trim.magnitude", (numel,), block.dtype, block.device)
            torch.abs(block.reshape(-1), out=magnitude[offset : offset + block.numel()])
        offset += block.numel()
    if density >= 1:
        return None
    return list(magnitude_threshold(magnitude, k)) if k else [float("inf"), 0]


def trim_block_(tau: torch.Tensor, trim: TrimState) -> torch.Tensor:
    """Consecutive entries of τ (in index order across calls) trimmed in place with `trim_state`:
    ties at the threshold go to the lowest indices, the earliest blocks, so `trim` counts them
    down. Returns τ."""
    if trim is not None:
        trim[1] -= keep_top_(tau, trim[0], int(trim[1]))
    return tau
