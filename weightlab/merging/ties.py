"""TIES-Merging (Yadav et al. 2023, "Resolving Interference When Merging Models", Alg. 1): trim
each τ_i = θ_i − θ_b to its top-density entries by magnitude, elect a sign per entry, take the
coefficient-weighted mean of the entries that agree, scale by λ.

Two passes over a tensor's blocks of rows (a `RowReader`): the statistics find each model's
threshold, then the blocks are merged. On the CPU in float32 both run in fused kernels
(`compute.ties_kernels`: thresholds by counting bits, one read of a block per step); elsewhere,
in torch (`compute.trim`, `elect_and_mean`). Both keep exactly `kept_count` entries per model,
ties at the threshold going to the lowest indices, and give the same bits."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from weightlab.compute import ties_kernels
from weightlab.compute.rows import RowReader
from weightlab.compute.scratch import buffer
from weightlab.compute.ties_kernels import BINS
from weightlab.compute.trim import TrimState, kept_count, trim_block_, trim_state_of_blocks
from weightlab.merging.params import Generator, Params, Tensor
from weightlab.merging.task_vectors import task_vector_into

TIES_CHUNK = 1 << 17  # entries per block of a tensor merged in memory by torch: its workspace stays small


def elect_and_mean(taus: list[torch.Tensor], coeffs: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """TIES steps 2-3: the sign of Σ_i c_i τ̂_i per entry (+ where it is 0), then the coefficient-weighted mean of
    the entries that agree with it (a disjoint mean: zero entries do not count); without
    `normalize`, their coefficient-weighted sum (mergekit's `normalize: false`). Accumulated one
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
    elected.sign_().mul_(2).add_(1).clamp_(-1, 1)  # -1, 1 stay; a sum of 0 elects + (mergekit's rule)
    merged.zero_()
    divisor.zero_()
    for c, tau in zip(cs, taus):
        torch.mul(tau, elected, out=part).clamp_(min=0)  # |τ| where sign(τ) is the elected one, else 0
        torch.sign(part, out=agree)  # 1 there, else 0
        merged.add_(part.mul_(elected), alpha=c)  # τ there (times ±1, exactly), else 0
        divisor.add_(agree, alpha=c)
    if not normalize:
        return merged
    # 0/0 where nothing agreed (the coefficients are non-negative, so merged is 0 there): 0
    return merged.div_(divisor).nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)


WINDOW = 2  # top-bit bins either side of the first block's guess whose low bits the first pass counts too


@dataclass
class CountedTrims:
    """Every model's trim of one tensor for the kernels: keep |τ_i| > thresholds[i] and, of the
    entries equal to it, the first ties[i] in index order. The blocks are merged in order, each
    taking the ties it holds until none are left (`cutoffs`)."""

    thresholds: np.ndarray  # float32, per model
    ties: np.ndarray  # int64, per model: ties still to keep, counted down block by block

    def cutoffs(self, base: Tensor, models: list[Tensor]) -> np.ndarray:
        """Per model, the flat index in this block below which entries at the threshold are kept."""
        cut: np.ndarray = np.zeros(len(models), np.int64)
        for i in np.flatnonzero(self.ties > 0).tolist():
            cut[i], kept = ties_kernels.nth_equal(base, models[i], float(self.thresholds[i]), int(self.ties[i]))
            self.ties[i] -= kept
        return cut


def _from_top(counts: np.ndarray, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of counts over bins, the bin holding the wanted-th largest entry and how many lie
    in the bins above it."""
    rows = np.arange(counts.shape[0])
    reaching = np.cumsum(counts[:, ::-1], axis=1)
    r = np.argmax(reaching >= wanted[:, None], axis=1)
    bins = counts.shape[1] - 1 - r
    return bins, reaching[rows, r] - counts[rows, bins]


def counted_trims(
    rows: RowReader, densities: list[float], started: Iterator[list[Tensor]] | None = None
) -> CountedTrims:
    """`CountedTrims`: the k_i = `kept_count` largest |τ_i| of each model, exactly, by counting
    bits (`ties_kernels.Counts`), nothing of the whole kept. The first block's own k-th largest
    (of a million of its entries) places a window of 2·WINDOW + 1 top-bit bins; one pass over
    the blocks counts the entries above it and the low bits of those inside it, which holds the
    tensor's k-th largest unless the first block misled (then a pass counts the top bits and
    another the window around the right bin). `started`: the first pass's blocks, already begun
    (`ties_trims` looked at the first block)."""
    models, numel = rows.inputs - 1, math.prod(rows.shape)
    if all(d >= 1 for d in densities) or numel == 0:  # everything kept (|τ| > -1)
        return CountedTrims(np.full(models, -1.0, np.float32), np.zeros(models, np.int64))
    wanted: np.ndarray = np.array([kept_count(d, numel) for d in densities], np.int64)
    width = 2 * WINDOW + 1

    def window_from(
        lowest: np.ndarray | None, passing: Iterator[list[Tensor]]
    ) -> tuple[np.ndarray, ties_kernels.Counts]:
        counts = ties_kernels.Counts(models, width)
        for blocks in passing:
            if lowest is None:  # the first block's k-th largest (of a million entries), mid-window
                sample = [b.reshape(-1)[:: max(1, b.numel() >> 20)] for b in blocks]
                first = ties_kernels.Counts(models, 1)
                first.add_high(sample[0], sample[1:])
                guess, _ = _from_top(
                    first.high(), np.array([max(1, int(d * sample[0].numel())) for d in densities], np.int64)
                )
                lowest = np.maximum(guess - WINDOW, 0)
            counts.add_window(blocks[0], blocks[1:], lowest)
        assert lowest is not None
        return lowest, counts

    lowest, counts = window_from(None, started or rows.all_blocks())
    above, inside = counts.above(), counts.window()
    if not np.all((above < wanted) & (wanted <= above + inside.sum(1))):
        high = ties_kernels.Counts(models, 1)
        for blocks in rows.all_blocks():
            high.add_high(blocks[0], blocks[1:])
        lowest, counts = window_from(_from_top(high.high(), wanted)[0], rows.all_blocks())
        above, inside = counts.above(), counts.window()
    at, above_at = _from_top(inside, wanted - above)
    thresholds = (((lowest + at // BINS) << 16) | (at % BINS)).astype(np.uint32).view(np.float32)
    return CountedTrims(thresholds, wanted - above - above_at)


def ties_trims(rows: RowReader, coeffs: Tensor, p: Params) -> CountedTrims | list[TrimState]:
    """Every model's threshold from blocks of rows: counted by the kernels where the blocks fit
    them (`counted_trims`), else the k-th largest |τ_i| by torch, one model at a time
    (`trim_state_of_blocks`, which holds one whole |τ|)."""
    blocks = rows.all_blocks()
    first = next(blocks)
    densities = list(p.each("density", rows.inputs - 1))
    if ties_kernels.fits(first[0], first[1:]):
        return counted_trims(rows, densities, itertools.chain([first], blocks))  # first: valid until block 2
    blocks.close()  # the read ahead ends before any other read
    numel = math.prod(rows.shape)

    def task_vector_blocks(i: int):  # type: ignore[no-untyped-def]
        for b, m in zip(rows.blocks(0), rows.blocks(i)):
            yield task_vector_into(buffer("task-vector", b.shape, b.dtype, b.device), m, b)

    return [trim_state_of_blocks(task_vector_blocks(i), numel, densities[i - 1]) for i in range(1, rows.inputs)]


def ties_block(
    base: Tensor, models: list[Tensor], coeffs: Tensor, p: Params, trims: CountedTrims | list[TrimState]
) -> Tensor:
    """TIES on the next block of a tensor (blocks in index order): trim with each model's
    threshold, ties at the threshold to the lowest indices, elect, mean, scale, add the base."""
    if isinstance(trims, CountedTrims):
        out = buffer("ties.merged", base.shape, base.dtype, base.device)
        cutoffs = trims.cutoffs(base, models)
        return ties_kernels.merge_block(
            base, models, coeffs.cpu().numpy(), trims.thresholds, cutoffs, p.lam, out, p.value("normalize")
        )
    taus = [
        trim_block_(task_vector_into(buffer(f"task-vector-{i}", base.shape, base.dtype, base.device), m, base), trim)
        for i, (m, trim) in enumerate(zip(models, trims))
    ]
    return elect_and_mean(taus, coeffs, p.value("normalize")).mul_(p.lam).add_(base)


def ties(base: Tensor, models: list[Tensor], coeffs: Tensor, p: Params, gen: Generator | None) -> Tensor:
    """TIES-Merging of whole tensors (Yadav et al. 2023, Alg. 1), by the executor's two steps on
    blocks of the flattened tensors (`ties_trims`, `ties_block`): the kernels take the tensor as
    one block, torch takes TIES_CHUNK entries at a time, so that its workspace stays small."""
    flat = [t.reshape(-1) for t in (base, *models)]
    numel = flat[0].numel()
    step = max(numel, 1) if ties_kernels.fits(flat[0], flat[1:]) else TIES_CHUNK
    spans = [(start, min(numel, start + step)) for start in range(0, numel, step)] or [(0, 0)]
    rows = RowReader(lambda i, start, stop: flat[i][start:stop], (numel,), spans, len(flat))
    trims = ties_trims(rows, coeffs, p)
    out = torch.empty_like(flat[0])
    for (start, stop), blocks in zip(spans, rows.all_blocks()):
        out[start:stop] = ties_block(blocks[0], blocks[1:], coeffs, p, trims)
    return out.reshape(base.shape)
