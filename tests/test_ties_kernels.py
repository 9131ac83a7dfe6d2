"""TIES's CPU kernels (`compute.ties_kernels`) against torch's formulas: the same thresholds (the
k-th largest |τ| counted by bits, against a selection), the same bits merged, with ties at the
threshold shared across blocks of rows, bfloat16 models read as stored, and coefficients that
are not 1 (the kernels round c·τ + s once, as torch's add with alpha does)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from weightlab.compute import ties_kernels
from weightlab.compute.rows import RowReader, row_spans
from weightlab.compute.trim import trim_threshold, trim_top_magnitude
from weightlab.merging.params import Params
from weightlab.merging.ties import CountedTrims, counted_trims, elect_and_mean, ties, ties_block, ties_trims


def grid_models(shape, dtype, seed=0, models=3):
    """A base and fine-tunes whose updates lie on a coarse grid (many ties at any threshold),
    one of them equal to the base on its first rows (zeros in τ)."""
    gen = torch.Generator().manual_seed(seed)
    maths = torch.float64 if dtype == torch.float64 else torch.float32  # bfloat16 models: a float32 base
    base = (torch.randn(shape, generator=gen) * 0.5).to(dtype).to(maths)
    fts = [(base + (torch.randn(shape, generator=gen) * 6).round() / 64).to(dtype) for _ in range(models)]
    fts[-1][:3] = base[:3].to(dtype)
    return base, fts


def reader(base, models, block_rows):
    inputs = [base, *models]
    spans = [(s, min(base.shape[0], s + block_rows)) for s in range(0, base.shape[0], block_rows)]
    return RowReader(lambda i, start, stop: inputs[i][start:stop], tuple(base.shape), spans, len(inputs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("density", [0.001, 0.2, 0.5, 0.97, 1.0])
def test_counted_thresholds_equal_the_selection_of_the_kth_largest(dtype, density):
    base, models = grid_models((301, 67), dtype)
    counted = counted_trims(reader(base, models, 37), [density] * len(models))
    for i, m in enumerate(models):
        if density >= 1:
            assert counted.thresholds[i] < 0  # everything kept
            continue
        threshold, ties_left = trim_threshold(m.float() - base, density)
        assert counted.thresholds[i] == np.float32(threshold) and counted.ties[i] == ties_left, i


def test_counting_handles_a_threshold_of_zero_and_nothing_kept():
    base = torch.zeros(50, 8)
    models = [base.clone() for _ in range(2)]
    models[0][0, :3] = 1.0  # three non-zero entries: the 100th largest |τ| is a zero
    counted = counted_trims(reader(base, models, 7), [0.25, 0.25])
    assert counted.thresholds.tolist() == [0.0, 0.0] and counted.ties.tolist() == [97, 100]
    one = counted_trims(reader(base, models, 7), [0.001, 0.001])  # int(0.4) = 0: the largest entry is kept
    assert one.thresholds.tolist() == [1.0, 0.0] and one.ties.tolist() == [1, 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("coeffs", [[1.0, 1.0, 1.0], [0.5, 0.0, 1.7]])
def test_kernels_merge_blocks_to_the_bits_of_the_torch_formulas(dtype, coeffs):
    """Blocks of 37 rows: the ties at each threshold run over several blocks, one of which keeps
    only some of its own (found by `nth_equal`); a coefficient of 0 and entries where no model
    agrees with the elected sign are in the data."""
    base, models = grid_models((301, 67), dtype, seed=1)
    c, p = torch.tensor(coeffs), Params({"density": 0.3, "lam": 0.8, "normalize": True})
    rows = reader(base, models, 37)
    trims = ties_trims(rows, c, p)
    assert isinstance(trims, CountedTrims)
    for i, m in enumerate(models):  # the block of the last tie kept holds the next one, left out
        at = torch.nonzero((m.float() - base).abs().reshape(-1) == float(trims.thresholds[i])).flatten().tolist()
        assert at[trims.ties[i] - 1] // (67 * 37) == at[trims.ties[i]] // (67 * 37)
    merged = torch.cat([ties_block(b[0], b[1:], c, p, trims).clone() for b in rows.all_blocks()])
    expected = base + 0.8 * elect_and_mean([trim_top_magnitude(m.float() - base, 0.3) for m in models], c)
    assert torch.equal(merged, expected)
    assert torch.equal(ties(base, models, c, p, None), expected)  # a whole tensor: one block


def test_torch_takes_what_the_kernels_do_not():
    """float64 maths (and any device but the CPU) go through torch, with the same thresholds."""
    base, models = grid_models((40, 9), torch.float64, seed=2)
    c, p = torch.ones(3, dtype=torch.float64), Params({"density": 0.3, "lam": 1.0, "normalize": True})
    assert not ties_kernels.fits(base, models)
    trims = ties_trims(reader(base, models, 7), c, p)
    assert isinstance(trims, list) and [t[0] for t in trims] == [trim_threshold(m - base, 0.3)[0] for m in models]
    expected = base + elect_and_mean([trim_top_magnitude(m - base, 0.3) for m in models], c)
    assert torch.equal(ties(base, models, c, p, None), expected)


def test_a_large_tensor_in_blocks_of_the_executor_size_matches_torch():
    """A tensor of a million entries read in the executor's row spans: bins that hold many
    values, counts summed over blocks."""
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(1000, 1000, generator=gen)
    models = [(base + torch.randn(base.shape, generator=gen) * 1e-2).bfloat16() for _ in range(2)]
    rows = RowReader(
        lambda i, start, stop: [base, *models][i][start:stop],
        (1000, 1000),
        row_spans(1000, 2 * 10**6, 250_000),
        3,
    )
    c, p = torch.tensor([0.6, 0.4]), Params({"density": 0.2, "lam": 1.0, "normalize": True})
    trims = ties_trims(rows, c, p)
    merged = torch.cat([ties_block(b[0], b[1:], c, p, trims).clone() for b in rows.all_blocks()])
    expected = base + elect_and_mean([trim_top_magnitude(m.float() - base, 0.2) for m in models], c)
    assert torch.equal(merged, expected)
    assert math.isclose(int((merged != base).sum()) / base.numel(), 0.2 * 2 - 0.2**2, rel_tol=0.05)


def test_a_first_block_unlike_the_rest_costs_a_second_pass_not_exactness(monkeypatch):
    """The first pass counts low bits only near where the first block puts the k-th largest; a
    first block of updates 100× larger misses that window, and the low bits are counted again."""
    made = []

    class Spy(ties_kernels.Counts):
        def __init__(self, models, width):
            made.append(width)
            super().__init__(models, width)

    monkeypatch.setattr(ties_kernels, "Counts", Spy)
    gen = torch.Generator().manual_seed(6)
    base = torch.randn(200, 50, generator=gen)
    models = [base + torch.randn(base.shape, generator=gen) * 1e-3 for _ in range(2)]
    counted_trims(reader(base, models, 20), [0.3] * len(models))  # blocks alike: one pass
    assert made == [5, 1]  # the window's counts, the first block's
    for m in models:
        m[:20] += torch.randn(20, 50, generator=gen)  # the first block: large updates
    counted = counted_trims(reader(base, models, 20), [0.3] * len(models))
    assert made == [5, 1, 5, 1, 1, 5]  # and the top bits, then the window around the right bin
    for i, m in enumerate(models):
        assert (counted.thresholds[i], counted.ties[i]) == tuple(np.float32(v) for v in trim_threshold(m - base, 0.3))
