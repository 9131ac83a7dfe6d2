"""Large tensors a block of rows at a time, so that memory holds blocks, not whole tensors
(`merge` for elementwise methods, `compare` for tall matrices)."""

from __future__ import annotations

ROW_BLOCK_BYTES = 16 << 20  # stored bytes per block; tensors larger than twice this are read in blocks


def row_spans(rows: int, nbytes: int, budget: int) -> list[tuple[int, int]]:
    """[start, stop) spans covering `rows` rows of a tensor of `nbytes` stored bytes, each about
    `budget` bytes (at least one row)."""
    step = max(1, budget * rows // max(nbytes, 1))
    return [(start, min(rows, start + step)) for start in range(0, rows, step)]
