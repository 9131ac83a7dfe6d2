"""TIES-Merging (Yadav et al. 2023, "Resolving Interference When Merging Models", Alg. 1): trim
each τ_i = θ_i − θ_b to its top-density entries by magnitude, elect a sign per entry, take the
coefficient-weighted mean of the entries that agree, scale by λ.

Two passes over a tensor's blocks of rows (a `RowReader`): the statistics find each model's
threshold, then the blocks are merged. On the CPU in float32 both run in fused kernels
(`compute.ties_kernels`: thresholds by counting bits, one read of a block per step); elsewhere,
in torch (`compute.trim`, `elect_and_mean`). Both keep exactly int(density·n) entries per model,
ties at the threshold going to the lowest indices, and give the same bits."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from weightlab.compute import ties_kernels
from weightlab.compute.rows import RowReader
from weightlab.compute.scratch import buffer
from weightlab.compute.trim import TrimState, trim_block_, trim_state_of_blocks
from weightlab.merging.params import Generator, Params, Tensor
from weightlab.merging.task_vectors import task_vector_into

TIES_CHUNK = 1 << 17  # entries per block of a tensor merged in memory by torch: its workspace stays small


def elect_and_mean(taus: list[torch.Tensor], coeffs: torch.Tensor) -> torch.Tensor:
    """TIES steps 2-3: the sign of Σ_i c_i τ̂_i per entry, then the coefficient-weighted mean of
    the entries that agree with it (a disjoint mean: zero entries do not count). Accumulated one
    model at a time in place, in buffers kept from one block to the next (`scratch.buffer`): the
    result is one of them, to be copied before the next call."""
    cs = coeffs.tolist()
    elected, merged, divisor, part, agree = (
        buffer(f"ties.{role}", taus[0].shape, taus[0].dtype, taus[0].device)
        for role in ("elected", "merged", "divisor", "part", "agree")
    )
    elected.zero_()
    for c, tau in zip(cs, taus):
        elected.add_(tau, alpha=c)
    elected.sign_()
    merged.zero_()
    divisor.zero_()
    for c, tau in zip(cs, taus):
        torch.mul(tau, elected, out=part).clamp_(min=0)  # |τ| where sign(τ) is the elected one, else 0
        torch.sign(part, out=agree)  # 1 there, else 0
        merged.add_(part.mul_(elected), alpha=c)  # τ there (times ±1, exactly), else 0
        divisor.add_(agree, alpha=c)
    # 0/0 where nothing agreed (the coefficients are non-negative, so merged is 0 there): 0
    return merged.div_(divisor).nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)


@dataclass
class CountedTrims:
    """Every model's trim of one tensor for the kernels: keep |τ_i| > thresholds[i], and of the
    entries equal to it the first ties[i] in index order. `equal` holds, block by block, how many
    such entries each block has; the blocks are merged in order, each taking its share of the ties."""

    thresholds: np.ndarray  # float32, per model
    ties: np.ndarray  # int64, per model: ties still to keep, counted down block by block
    equal: list[np.ndarray] = field(default_factory=list)  # per block, per model; empty: no ties to place
    block: int = 0  # the next block to merge

    def cutoffs(self, base: Tensor, models: list[Tensor]) -> np.ndarray:
        """Per model, the flat index in this block below which entries at the threshold are kept."""
        size = base.numel()
        cut: np.ndarray = np.zeros(len(models), np.int64)
        equal = self.equal[self.block] if self.equal else np.zeros(len(models), np.int64)
        for i, (here, left) in enumerate(zip(equal.tolist(), self.ties.tolist())):
            take = min(here, left)
            if take == here:
                cut[i] = size  # every tie here is kept (or there is none)
            elif take:
                cut[i] = ties_kernels.nth_equal(base, models[i], float(self.thresholds[i]), take)
            self.ties[i] -= take
        self.block += 1
        return cut


def _from_top(counts: np.ndarray, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of counts over bins, the bin holding the wanted-th largest entry and how many lie
    in the bins above it."""
    rows = np.arange(counts.shape[0])
    reaching = np.cumsum(counts[:, ::-1], axis=1)
    r = np.argmax(reaching >= wanted[:, None], axis=1)
    bins = counts.shape[1] - 1 - r
    return bins, reaching[rows, r] - counts[rows, bins]


def counted_trims(rows: RowReader, density: float) -> CountedTrims:
    """`CountedTrims` by two passes over the blocks (`ties_kernels.count_high`, `count_low`): the
    k = int(density·n) largest |τ_i| of each model, exactly, and nothing of the whole kept."""
    models, numel = rows.inputs - 1, math.prod(rows.shape)
    k = int(density * numel)
    if density >= 1 or k == 0:  # everything kept (|τ| > -1), or nothing (|τ| > inf)
        return CountedTrims(np.full(models, -1.0 if density >= 1 else math.inf, np.float32), np.zeros(models, np.int64))
    wanted: np.ndarray = np.full(models, k, np.int64)
    high: np.ndarray = np.zeros((models, ties_kernels.BINS), np.int64)
    for blocks in rows.all_blocks():
        high += ties_kernels.count_high(blocks[0], blocks[1:])
    top, above_top = _from_top(high, wanted)
    low = [ties_kernels.count_low(blocks[0], blocks[1:], top) for blocks in rows.all_blocks()]
    bottom, above_bottom = _from_top(np.sum(low, axis=0), wanted - above_top)
    thresholds = ((top.astype(np.uint32) << 16) | bottom.astype(np.uint32)).view(np.float32)
    ties = wanted - above_top - above_bottom
    return CountedTrims(thresholds, ties, [block[np.arange(models), bottom] for block in low])


def ties_trims(rows: RowReader, coeffs: Tensor, p: Params) -> CountedTrims | list[TrimState]:
    """Every model's threshold from blocks of rows: counted by the kernels where the blocks fit
    them (`counted_trims`), else the k-th largest |τ_i| by torch, one model at a time
    (`trim_state_of_blocks`, which holds one whole |τ|)."""
    blocks = rows.all_blocks()
    first = next(blocks)
    fits = ties_kernels.fits(first[0], first[1:])
    blocks.close()  # the read ahead ends before any other read
    if fits:
        return counted_trims(rows, p.density)
    numel = math.prod(rows.shape)

    def task_vector_blocks(i: int):  # type: ignore[no-untyped-def]
        for b, m in zip(rows.blocks(0), rows.blocks(i)):
            yield task_vector_into(buffer("task-vector", b.shape, b.dtype, b.device), m, b)

    return [trim_state_of_blocks(task_vector_blocks(i), numel, p.density) for i in range(1, rows.inputs)]


def ties_block(
    base: Tensor, models: list[Tensor], coeffs: Tensor, p: Params, trims: CountedTrims | list[TrimState]
) -> Tensor:
    """TIES on the next block of a tensor (blocks in index order): trim with each model's
    threshold, ties at the threshold to the lowest indices, elect, mean, scale, add the base."""
    if isinstance(trims, CountedTrims):
        out = buffer("ties.merged", base.shape, base.dtype, base.device)
        cutoffs = trims.cutoffs(base, models)
        return ties_kernels.merge_block(base, models, coeffs.cpu().numpy(), trims.thresholds, cutoffs, p.lam, out)
    taus = [
        trim_block_(task_vector_into(buffer(f"task-vector-{i}", base.shape, base.dtype, base.device), m, base), trim)
        for i, (m, trim) in enumerate(zip(models, trims))
    ]
    return elect_and_mean(taus, coeffs).mul_(p.lam).add_(base)


def ties(base: Tensor, models: list[Tensor], coeffs: Tensor, p: Params, gen: Generator | None) -> Tensor:
    """TIES-Merging of whole tensors (Yadav et al. 2023, Alg. 1), by the executor's two steps on
    blocks of the flattened tensors (`ties_trims`, `ties_block`): the kernels take the tensor as
    one block, torch takes TIES_CHUNK entries at a time, so that its workspace stays small."""
    flat = [t.reshape(-1) for t in (base, *models)]
    numel = flat[0].numel()
    step = numel if ties_kernels.fits(flat[0], flat[1:]) else TIES_CHUNK
    spans = [(start, min(numel, start + step)) for start in range(0, numel, step)] or [(0, 0)]
    rows = RowReader(lambda i, start, stop: flat[i][start:stop], (numel,), spans, len(flat))
    trims = ties_trims(rows, coeffs, p)
    out = torch.empty_like(flat[0])
    for (start, stop), blocks in zip(spans, rows.all_blocks()):
        out[start:stop] = ties_block(blocks[0], blocks[1:], coeffs, p, trims)
    return out.reshape(base.shape)
