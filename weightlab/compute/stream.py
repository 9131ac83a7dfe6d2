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
from typing import Iterator, Sequence

import torch

from weightlab.compute.memory import release_large_buffers
from weightlab.io.adapter import AdaptedCheckpoint
from weightlab.io.checkpoint import Checkpoint
from weightlab.io.finite import require_finite_input
from weightlab.matching import MatchedTensor
from weightlab.naming import as_matrix

_DONE = object()
READ_AHEAD_BYTES = 256 << 20


def batches(items: Sequence[MatchedTensor], batch_size: int) -> list[list[MatchedTensor]]:
    """Group same-shape items (in their given order) into batches of at most `batch_size`."""
    groups: dict[tuple[int, ...], list[MatchedTensor]] = {}
    for item in items:
        groups.setdefault(item.shape, []).append(item)
    out = []
    for group in groups.values():
        out.extend(group[i:i + batch_size] for i in range(0, len(group), batch_size))
    return out


def _stored(ckpt: Checkpoint) -> Checkpoint:
    """Where the raw tensors are: an adapted checkpoint's base (the update is added later)."""
    return ckpt.base if isinstance(ckpt, AdaptedCheckpoint) else ckpt


def _prepare(ckpt: Checkpoint, name: str, raw: torch.Tensor, device: torch.device, dtype: torch.dtype,
             matrix: bool) -> torch.Tensor:
    if not raw.is_floating_point():
        return raw.to(device)
    weight = raw.to(device=device, dtype=dtype)
    if isinstance(ckpt, AdaptedCheckpoint):
        weight = ckpt.apply(name, weight)
    require_finite_input(weight, ckpt.path, name)
    return as_matrix(name, weight, ckpt.config) if matrix else weight


def stream_matrices(sources: Sequence[Checkpoint], items: Sequence[MatchedTensor], device: torch.device,
                    dtype: torch.dtype, batch_size: int = 1, prefetch: int = 2,
                    matrix: bool = True) -> Iterator[tuple[list[MatchedTensor], list[torch.Tensor]]]:
    """Yield (batch items, one stack [b, ...] per source), read ahead of use: out×in matrices
    (`as_matrix`), or with `matrix=False` tensors in their stored layout. Floating tensors are
    cast to `dtype` and checked finite; others keep their dtype."""
    release_large_buffers()
    pending: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
    stop = threading.Event()
    room = threading.Condition()
    in_flight = [0]  # bytes read and not yet released by the consumer

    def produce() -> None:
        try:
            for batch in batches(items, batch_size):
                size = sum(_stored(c).info(n).nbytes for item in batch for c, n in zip(sources, item.names))
                with room:
                    room.wait_for(lambda: stop.is_set() or not in_flight[0] or in_flight[0] + size <= READ_AHEAD_BYTES)
                    in_flight[0] += size
                if stop.is_set():
                    return
                pending.put((batch, size, [[_stored(c).get(n) for c, n in zip(sources, item.names)] for item in batch]))
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
            per_source = zip(*[[_prepare(c, n, raw, device, dtype, matrix) for c, n, raw in zip(sources, item.names, item_raws)]
                               for item, item_raws in zip(batch, raws)])
            del got, raws
            yield batch, [torch.stack(mats) if len(mats) > 1 else mats[0].unsqueeze(0) for mats in per_source]
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
