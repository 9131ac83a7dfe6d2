"""Buffers reused from one block to the next: the same storage for a role inside
`reusing_buffers`, fresh tensors outside, released when the context ends; and the TIES blocks
that use them map nothing new after the first block."""

from __future__ import annotations

import resource

import pytest
import torch

from weightlab.compute.memory import release_large_buffers
from weightlab.compute.scratch import buffer, held_bytes, reusing_buffers
from weightlab.merging.methods import METHODS


def test_a_role_keeps_its_storage_inside_the_context_and_grows_to_the_largest_size():
    with reusing_buffers():
        a = buffer("a", (4, 5), torch.float32, "cpu")
        again = buffer("a", (2, 10), torch.float32, "cpu")
        other = buffer("b", (4, 5), torch.float32, "cpu")
        assert again.data_ptr() == a.data_ptr() and again.shape == (2, 10)
        assert other.data_ptr() != a.data_ptr()
        assert buffer("a", (3,), torch.float64, "cpu").dtype == torch.float64  # a dtype is a role of its own
        grown = buffer("a", (100,), torch.float32, "cpu")
        assert grown.numel() == 100 and buffer("a", (7,), torch.float32, "cpu").data_ptr() == grown.data_ptr()
        with reusing_buffers():  # nested: the same pool
            assert buffer("b", (4, 5), torch.float32, "cpu").data_ptr() == other.data_ptr()
        assert held_bytes() == 100 * 4 + 20 * 4 + 3 * 8
    assert held_bytes() == 0
    outside = [buffer("a", (4, 5), torch.float32, "cpu") for _ in range(2)]
    assert outside[0].data_ptr() != outside[1].data_ptr()


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@pytest.mark.parametrize("method,given", [("ties", {"density": 0.2}), ("task-arithmetic", {})])
def test_row_blocks_after_the_first_map_no_new_memory(method, given):
    """Each fresh 8 MB tensor costs ~2000 page faults once glibc maps it anew; a block of TIES
    (trim, elect, disjoint mean, scale) or of task arithmetic allocates nothing that size after
    the first block."""
    release_large_buffers()
    gen = torch.Generator().manual_seed(0)
    rows, cols = 512, 4096  # 8 MB blocks in float32
    base = torch.randn(rows, cols, generator=gen)
    models = [(base + torch.randn(rows, cols, generator=gen) * 0.1).to(torch.bfloat16) for _ in range(3)]
    spec = METHODS[method]
    params = spec.resolve(given)
    coeffs = torch.ones(3)
    trims = [[0.05, 10], [0.05, 10], [0.05, 10]]  # ties to look for, block after block
    assert spec.blockwise is not None
    with reusing_buffers():
        spec.blockwise(base, models, coeffs, params, trims)
        before = _minor_faults()
        for _ in range(4):
            spec.blockwise(base, models, coeffs, params, trims)
        faults = _minor_faults() - before
    page_per_block = rows * cols * 4 // resource.getpagesize()
    assert faults < page_per_block, faults  # fewer than one fresh block in four calls
