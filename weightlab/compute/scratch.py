"""Buffers reused from one block of rows to the next, and from one tensor to the next.

A large tensor freshly allocated costs more than most arithmetic on it: glibc maps it anew
(`memory.release_large_buffers`) and the kernel zeroes it page by page on first touch, ~25 ms per
32 MB on this class of machine against ~1.5 ms for an elementwise pass over a buffer already
mapped. A loop that merges a 7B model a block at a time would spend most of its time there.
Inside `reusing_buffers()` (the merge executor's tensor loop), `buffer(role, …)` hands out one
buffer per role, grown to the largest size asked and kept until the context ends; outside it,
a fresh tensor. Per thread: a read-ahead thread never sees the loop's buffers.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_local = threading.local()


@contextmanager
def reusing_buffers() -> Iterator[None]:
    """Within this context (on this thread), `buffer` keeps what it hands out for the next call
    with the same role; everything is released when the outermost context ends."""
    outer = getattr(_local, "buffers", None)
    if outer is None:
        _local.buffers = {}
    try:
        yield
    finally:
        if outer is None:
            _local.buffers = None


def buffer(role: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """An uninitialised tensor of `shape` for `role`: inside `reusing_buffers`, a view of the one
    buffer kept for that role (its contents until the role is asked for again, so two live
    tensors need two roles); outside, a fresh tensor."""
    held: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] | None = getattr(_local, "buffers", None)
    if held is None:
        return torch.empty(shape, dtype=dtype, device=device)
    key, numel = (role, dtype, torch.device(device)), math.prod(shape)
    if key not in held or held[key].numel() < numel:
        held.pop(key, None)  # the smaller one goes first: never both at once
        held[key] = torch.empty(numel, dtype=dtype, device=device)
    return held[key][:numel].view(shape)


def held_bytes() -> int:
    """What the buffers kept on this thread take (0 outside `reusing_buffers`)."""
    held = getattr(_local, "buffers", None) or {}
    return sum(t.numel() * t.element_size() for t in held.values())
