"""Large tensors a block of rows at a time, so that memory holds blocks, not whole tensors
(`merge` for elementwise methods, `compare` for tall matrices)."""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

import torch

T = TypeVar("T")
ROW_BLOCK_BYTES = 16 << 20  # stored bytes per block; tensors larger than twice this are read in blocks
KEPT_TENSOR_BYTES = 512 << 20  # a tensor read more than once is kept whole, as read, up to this (all inputs)


def row_spans(rows: int, nbytes: int, budget: int) -> list[tuple[int, int]]:
    """[start, stop) spans covering `rows` rows of a tensor of `nbytes` stored bytes, each about
    `budget` bytes (at least one row)."""
    step = max(1, budget * rows // max(nbytes, 1))
    return [(start, min(rows, start + step)) for start in range(0, rows, step)]


@dataclass(frozen=True)
class RowReader:
    """One tensor of several inputs (0: the base, where there is one), read a block of rows at a
    time: what a method's statistics pass sees of a tensor it never holds whole."""

    # (input, start, stop) -> those rows, checked finite; valid until that input's next block is
    # asked for (the executor reads into two kept buffers per input, one of them read ahead)
    read: Callable[[int, int, int], torch.Tensor]
    shape: tuple[int, ...]
    spans: list[tuple[int, int]]
    inputs: int

    def blocks(self, i: int) -> Generator[torch.Tensor, None, None]:
        """Input i's rows, block after block, in order (the next read ahead)."""
        return read_ahead([partial(self.read, i, start, stop) for start, stop in self.spans])

    def all_blocks(self) -> Generator[list[torch.Tensor], None, None]:
        """Every input's rows of each block together, block after block (the next read ahead)."""
        return read_ahead([partial(self._all, start, stop) for start, stop in self.spans])

    def _all(self, start: int, stop: int) -> list[torch.Tensor]:
        return [self.read(i, start, stop) for i in range(self.inputs)]


def read_ahead(reads: Sequence[Callable[[], T]]) -> Generator[T, None, None]:
    """Each read's result in order, the next one running on a background thread while the caller
    works on this one: reading (and its cast and finite check, which release the GIL) overlaps
    the maths instead of adding to it. One read in flight."""
    with ThreadPoolExecutor(1, thread_name_prefix="weightlab-rows") as pool:
        pending = pool.submit(reads[0]) if reads else None
        for k in range(len(reads)):
            assert pending is not None
            result = pending.result()
            pending = pool.submit(reads[k + 1]) if k + 1 < len(reads) else None
            yield result
