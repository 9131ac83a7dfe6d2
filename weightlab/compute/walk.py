"""The one pass every analysis and surgery makes over the tensors of its checkpoints.

`TensorWalk(sources, selection, changed_by=...)` decides what is visited: tensors every source
has with one shape (matched by canonical name), floating, matrices (or any tensor of at least
`min_elements` entries), within `--include`/`--exclude`, and — when fine-tunes are adapters —
only the modules an adapter changes (elsewhere W' = W by construction). `walk.batches(compute)`
then reads them ahead of use, checks every floating value finite, stacks same-shape tensors into
batches of `compute.batch_size` and reports progress. Analyses keep only their maths.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple, TypeVar

import torch

from weightlab.compute.cluster import map_on_cluster
from weightlab.compute.device import Compute
from weightlab.compute.progress import Progress, read_bytes
from weightlab.compute.stream import stream_matrices
from weightlab.domains import compile_filter
from weightlab.io.adapter import AdaptedCheckpoint
from weightlab.io.checkpoint import Checkpoint
from weightlab.matching import MatchedTensor, match_checkpoints
from weightlab.naming import is_conv_kernel
from weightlab.options import Filters

T = TypeVar("T")


@dataclass(frozen=True)
class Selection:
    """Which matched tensors a walk visits."""

    include: str | None = None
    exclude: str | None = None
    matrices: bool = True  # 2-D (or conv) weights with both sides > 1; else any tensor
    floating: bool = True  # floating tensors only (merging also copies integer buffers)
    min_elements: int = 1
    names: frozenset[str] | None = None  # only these (first-source) names, e.g. LoRA targets

    @classmethod
    def of(cls, filters: Filters, **more: Any) -> Selection:
        return cls(filters.include, filters.exclude, **more)


def select(matched: Sequence[MatchedTensor], selection: Selection) -> list[MatchedTensor]:
    """The matched tensors `selection` keeps, in their order."""
    inc, exc = compile_filter(selection.include, "--include"), compile_filter(selection.exclude, "--exclude")
    chosen = []
    for item in matched:
        name = item.names[0]
        if (selection.floating and not item.is_float) or math.prod(item.shape) < selection.min_elements:
            continue
        if selection.matrices and (len(item.shape) < 2 or min(item.shape[0], math.prod(item.shape[1:])) < 2):
            continue
        if selection.matrices and len(item.shape) > 2 and not is_conv_kernel(name, item.shape):
            continue  # no matrix to read (`problems` says so); fused experts come split (`io.experts`)
        if (inc and not inc.search(name)) or (exc and exc.search(name)):
            continue
        if selection.names is not None and name not in selection.names:
            continue
        chosen.append(item)
    return chosen


def may_change(ckpt: Checkpoint, name: str) -> bool:
    """False only when `ckpt` is an adapter that leaves `name` as the base has it."""
    return not isinstance(ckpt, AdaptedCheckpoint) or ckpt.changes(name)


def _walk_items(
    sources: Sequence[Checkpoint],
    items: Sequence[MatchedTensor],
    compute: Compute,
    *,
    work: Callable[[Batch, Compute], list[T]],
    factors: bool,
    stored_layout: bool,
) -> list[T]:
    """A walk over items already matched and selected, here: what a Ray task runs on its share."""
    return TensorWalk.of_items(sources, items).map(work, compute, factors=factors, stored_layout=stored_layout)


class Batch(NamedTuple):
    items: list[MatchedTensor]
    tensors: list[torch.Tensor | None]  # per source a stack [b, ...]; None: an adapter read as factors

    def dense(self) -> list[torch.Tensor]:
        """Every source's stack, for a walk made without `factors` (no slot is None then)."""
        assert all(t is not None for t in self.tensors), "an adapter read as factors"
        return [t for t in self.tensors if t is not None]


class TensorWalk:
    """What one pass visits; `batches()` makes the pass.

    `changed_by` names the fine-tunes whose change the analysis is about: a tensor is kept when
    any of them (with `every=True`: each of them) may change it (see `may_change`)."""

    def __init__(
        self,
        sources: Sequence[Checkpoint],
        selection: Selection = Selection(),
        *,
        changed_by: Sequence[Checkpoint] = (),
        every: bool = False,
    ):
        self.sources = list(sources)
        self.matching = match_checkpoints(self.sources)
        rule = all if every else any
        self.items = [
            item
            for item in select(self.matching.matched, selection)
            if not changed_by or rule(may_change(c, item.names[0]) for c in changed_by)
        ]
        self._position = {item.names[0]: i for i, item in enumerate(self.items)}
        self.unknown = [  # what an analysis cannot read as matrices (a merge takes every tensor)
            item.names[0]
            for item in self.matching.matched
            if selection.matrices and len(item.shape) > 2 and not is_conv_kernel(item.names[0], item.shape)
        ]

    @classmethod
    def of_items(cls, sources: Sequence[Checkpoint], items: Sequence[MatchedTensor]) -> TensorWalk:
        """A walk over items already matched and selected (a Ray task's share of a walk)."""
        walk = cls.__new__(cls)
        walk.sources, walk.items = list(sources), list(items)  # no matching: the driver matched them
        walk._position = {item.names[0]: i for i, item in enumerate(walk.items)}
        return walk

    def __len__(self) -> int:
        return len(self.items)

    def map(
        self,
        work: Callable[[Batch, Compute], list[T]],
        compute: Compute,
        *,
        factors: bool = False,
        stored_layout: bool = False,
        on_start: Progress | None = None,
        on_progress: Progress | None = None,
    ) -> list[T]:
        """`work(batch, compute)` over every batch, results concatenated in batch order: here, or
        on the Ray cluster `compute.cluster` names (split by tensor, the same results)."""
        if compute.cluster is not None:
            body = partial(_walk_items, work=work, factors=factors, stored_layout=stored_layout)
            return map_on_cluster(self.sources, self.items, body, compute, on_start, on_progress)
        out: list[T] = []
        for batch in self.batches(
            compute, factors=factors, stored_layout=stored_layout, on_start=on_start, on_progress=on_progress
        ):
            out.extend(work(batch, compute))
            del batch  # before the next batch arrives: one batch in memory
        return out

    def take(self, wanted: Callable[[MatchedTensor], bool]) -> list[MatchedTensor]:
        """Remove the items `wanted` picks from the pass and return them: the caller reads those
        itself (e.g. a block of rows at a time). Result order (`in_order`) still knows them."""
        taken = [item for item in self.items if wanted(item)]
        self.items = [item for item in self.items if not wanted(item)]
        return taken

    @property
    def problems(self) -> list[str]:
        """Tensors only some sources have, shape mismatches, and tensors of more than two
        dimensions of no known layout (never read as a matrix), as lines for the user."""
        unknown = [
            f"{name}: a {len(shape)}-D tensor {list(shape)} of no known layout (neither a convolution kernel nor "
            "a Mixture-of-Experts expert tensor): not analysed"
            for name, shape in ((n, self.sources[0].info(n).shape) for n in getattr(self, "unknown", []))
        ]
        return self.matching.describe_problems() + unknown

    def in_order(
        self, results: list[T], name_of: Callable[[T], str], group: Callable[[T], Any] = lambda r: 0
    ) -> list[T]:
        """`results` in the walk's tensor order (within each `group`): the same order whatever the
        batch size, so a GPU run writes the same JSON as a CPU run."""
        return sorted(results, key=lambda r: (group(r), self._position[name_of(r)]))

    def batches(
        self,
        compute: Compute,
        *,
        factors: bool = False,
        stored_layout: bool = False,
        on_start: Progress | None = None,
        on_progress: Progress | None = None,
    ) -> Iterator[Batch]:
        """Read ahead, check finite, stack same-shape tensors. Tensors are out×in matrices
        (`naming.as_matrix`) unless `stored_layout`. With `factors`, an adapter is not applied
        densely where its change is a LoRA product (or nothing): its slot is None and the analysis
        reads the factors (`compute.deltas`); a LoRA bias or a saved tensor is read as W'."""
        if on_start:
            on_start(len(self.items), read_bytes(self.items, len(self.sources)))

        def skip(source: int, item: MatchedTensor) -> bool:
            ckpt = self.sources[source]
            return factors and isinstance(ckpt, AdaptedCheckpoint) and not ckpt.changes_densely(item.names[source])

        stream = stream_matrices(
            self.sources,
            self.items,
            compute.device,
            compute.dtype,
            compute.batch_size,
            compute.prefetch,
            matrix=not stored_layout,
            skip=skip,
        )
        for items, tensors in stream:
            yield Batch(items, tensors)
            del tensors  # before the next batch is prepared: one batch in memory
            if on_progress:
                on_progress(len(items), read_bytes(items, len(self.sources)))
