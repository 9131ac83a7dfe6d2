"""Run a tensor walk's work on a Ray cluster: split by tensor, gather in order.

Each task gets the checkpoints (small objects: paths and headers; they pickle to a few KB), a
run of consecutive items and the work function. The worker opens the files lazily from the
same paths, so every node must see them (a shared filesystem, or the same copy at the same
path); a path a worker cannot read is an error naming the node and the path. The results come
back in item order, so the driver assembles exactly what a local run assembles. Ray retries a
task whose worker died (`max_retries`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from weightlab.compute.device import Compute, use_threads
from weightlab.compute.progress import Progress, read_bytes
from weightlab.compute.ray_connect import connect
from weightlab.errors import CheckpointNotFound, WeightlabError
from weightlab.io.checkpoint import Checkpoint
from weightlab.matching import MatchedTensor

R = TypeVar("R")
TASKS_PER_WORKER = 4  # tasks per CPU of the cluster: enough to balance, few enough to keep overheads small


Body = Callable[[Sequence[Checkpoint], Sequence[MatchedTensor], Compute], list[R]]  # the walk over some items


def _run_here(
    body: Body[R], sources: Sequence[Checkpoint], items: Sequence[MatchedTensor], compute: Compute
) -> list[R]:
    """A task, on a worker: `body` over these items, on this node's device."""
    use_threads(compute.threads)  # the driver's count (Ray starts workers with one): BLAS sums in an order
    # that depends on it, and the bytes are to equal a local run's
    try:
        return body(sources, items, compute.on_this_node())
    except OSError as e:
        import socket

        raise CheckpointNotFound(
            f"cannot be read on Ray node {socket.gethostname()} ({e.strerror or e})", e.filename or "a checkpoint path"
        ) from None


def map_on_cluster(
    sources: Sequence[Checkpoint],
    items: Sequence[MatchedTensor],
    body: Body[R],
    compute: Compute,
    on_start: Progress | None = None,
    on_progress: Progress | None = None,
) -> list[R]:
    """`body` over `items` in Ray tasks of consecutive items; results in item order."""
    assert compute.cluster is not None
    ray = connect(compute.cluster, compute.cluster_timeout)
    if on_start:
        on_start(len(items), read_bytes(items, len(sources)))
    workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
    size = max(1, -(-len(items) // (TASKS_PER_WORKER * workers)))
    runs = [list(items[i : i + size]) for i in range(0, len(items), size)]
    task = ray.remote(max_retries=3)(_run_here)
    shared_body, shared_sources, shared_compute = (ray.put(x) for x in (body, list(sources), compute))
    pending = {task.remote(shared_body, shared_sources, run, shared_compute): i for i, run in enumerate(runs)}
    done: dict[int, list[R]] = {}
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            index = pending.pop(ready[0])
            done[index] = ray.get(ready[0])
            if on_progress:
                on_progress(len(runs[index]), read_bytes(runs[index], len(sources)))
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        for ref in pending:
            ray.cancel(ref)
        if isinstance(cause, WeightlabError):
            raise cause from None
        raise
    return [r for i in range(len(runs)) for r in done[i]]
