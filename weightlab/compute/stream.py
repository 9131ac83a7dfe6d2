"""Stream matched tensors from several checkpoints, reading ahead on a background thread.

The background thread only reads (a pread into a fresh buffer, which releases the GIL and
spawns no compute threads); conversion, checks and maths stay on the calling thread. On a
2-core machine any compute work in a second thread stalls the math library's parallel kernels,
so the split matters. At most `prefetch` batches wait in the queue, and reading ahead stops
while READ_AHEAD_BYTES are in flight (read and not yet done with), unless nothing is: a large
tensor (an embedding) is never held twice, and memory stays bounded by a few tensors whatever
the model size.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Hashable, Iterator, Sequence
from functools import partial
from typing import Any

import torch

from weightlab.compute.memory import release_large_buffers
from weightlab.io.adapter import AdaptedCheckpoint
from weightlab.io.checkpoint import Checkpoint
from weightlab.io.finite import require_finite_input
from weightlab.matching import MatchedTensor
from weightlab.naming import as_matrix

_DONE = object()
READ_AHEAD_BYTES = 256 << 20


def _room_for(size: int, stop: threading.Event, in_flight: list[int], bound: int = READ_AHEAD_BYTES) -> bool:
    """Read ahead `size` more bytes now? Yes when stopping, when nothing is in flight, or under the bound."""
    return stop.is_set() or not in_flight[0] or in_flight[0] + size <= bound


def batches(
    items: Sequence[MatchedTensor], batch_size: int, kind: Callable[[MatchedTensor], Hashable] = lambda item: None
) -> list[list[MatchedTensor]]:
    """Group items of one shape and one `kind` (in their given order) into batches of at most `batch_size`."""
    groups: dict[tuple[tuple[int, ...], Hashable], list[MatchedTensor]] = {}
    for item in items:
        groups.setdefault((item.shape, kind(item)), []).append(item)
    out: list[list[MatchedTensor]] = []
    for group in groups.values():
        out.extend(group[i : i + batch_size] for i in range(0, len(group), batch_size))
    return out


def _read(ckpt: Checkpoint, name: str) -> torch.Tensor:
    """The raw tensor as stored: for an adapted checkpoint, the one its update is added to later."""
    return ckpt.stored(name) if isinstance(ckpt, AdaptedCheckpoint) else ckpt.get(name)


def _prepare(
    ckpt: Checkpoint, name: str, raw: torch.Tensor, device: torch.device, dtype: torch.dtype, matrix: bool
) -> torch.Tensor:
    if not raw.is_floating_point():
        return raw.to(device)
    weight = raw.to(device=device, dtype=dtype)
    if isinstance(ckpt, AdaptedCheckpoint):
        weight = ckpt.apply(name, weight)
    require_finite_input(weight, ckpt.path, name)
    return as_matrix(name, weight, ckpt.config) if matrix else weight


def stream_matrices(
    sources: Sequence[Checkpoint],
    items: Sequence[MatchedTensor],
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int = 1,
    prefetch: int = 2,
    matrix: bool = True,
    skip: Callable[[int, MatchedTensor], bool] = lambda source, item: False,
) -> Iterator[tuple[list[MatchedTensor], list[torch.Tensor | None]]]:
    """Yield (batch items, one stack [b, ...] per source), read ahead of use: out×in matrices
    (`as_matrix`), or with `matrix=False` tensors in their stored layout. Floating tensors are
    cast to `dtype` and checked finite; others keep their dtype. Where `skip(source, item)`, that
    source is not read and its slot is None (batches never mix skipped and read items)."""

    def unread(item: MatchedTensor) -> tuple[bool, ...]:
        return tuple(skip(i, item) for i in range(len(sources)))

    release_large_buffers()
    pending: queue.Queue[Any] = queue.Queue(maxsize=max(1, prefetch))
    stop = threading.Event()
    room = threading.Condition()
    in_flight = [0]  # bytes read and not yet released by the consumer
    # reading ahead hides storage latency; models in memory have none, so their copies come one batch at a time
    bound = READ_AHEAD_BYTES if any(c.read_ahead for c in sources) else 0

    def produce() -> None:
        try:
            for batch in batches(items, batch_size, unread):
                read = [not s for s in unread(batch[0])]
                size = sum(c.info(n).nbytes for item in batch for c, n, r in zip(sources, item.names, read) if r)
                with room:
                    room.wait_for(partial(_room_for, size, stop, in_flight, bound))
                    in_flight[0] += size
                if stop.is_set():
                    return
                pending.put(
                    (
                        batch,
                        size,
                        [[_read(c, n) if r else None for c, n, r in zip(sources, item.names, read)] for item in batch],
                    )
                )
            pending.put(_DONE)
        except BaseException as e:  # hand the error to the consumer, who re-raises it
            pending.put(e)

    worker = threading.Thread(target=produce, daemon=True, name="weightlab-prefetch")
    worker.start()
    try:
        while (got := pending.get()) is not _DONE:
            if isinstance(got, BaseException):
                raise got
            batch, size, raws = got
            per_source = zip(
                *[
                    [
                        None if raw is None else _prepare(c, n, raw, device, dtype, matrix)
                        for c, n, raw in zip(sources, item.names, item_raws)
                    ]
                    for item, item_raws in zip(batch, raws)
                ]
            )
            del got, raws
            yield (
                batch,
                [
                    None if mats[0] is None else torch.stack(mats) if len(mats) > 1 else mats[0].unsqueeze(0)
                    for mats in per_source
                ],
            )
            with room:  # the caller is done with this batch
                in_flight[0] -= size
                room.notify()
    finally:
        stop.set()
        with room:
            room.notify()
        while worker.is_alive():  # unblock a producer waiting on a full queue
            try:
                pending.get_nowait()
            except queue.Empty:
                worker.join(timeout=0.05)
