"""Where each output tensor of a merge comes from, when its layers are taken in slices.

A recipe's `slices` (mergekit's format) stack output layers from layer ranges of the inputs:
`passthrough` of one source per slice makes a frankenmerge (layers repeated or interleaved from
several models), a slice of several sources merges those sources' layers. Output layers are
numbered from 0 in slice order; the tensors outside the layers come from the first slice's
sources (those before the layers: embeddings) and the last slice's (the final norm, the head).

`SliceViews` presents this as one checkpoint per position in a slice (the base, then each other
source), under the output's names, so the merge executor streams it as it streams any merge; a
view answers where each of its tensors comes from (`origin`), for the settings of that slice and
model (`MergeConfig.tensor_params`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from weightlab.errors import InvalidArgument
from weightlab.io.checkpoint import Checkpoint
from weightlab.io.safetensors_file import TensorInfo
from weightlab.merging.settings import Setting, position
from weightlab.model_config import LAYER_COUNT_KEYS, ModelConfig, model_config_from_dict
from weightlab.naming import before_layers, layer_index, renumbered


@dataclass(frozen=True)
class SliceSource:
    """One model's layers [start, stop) in a slice, with its own settings."""

    model: str
    layers: tuple[int, int]
    params: dict[str, Setting] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return self.layers[1] - self.layers[0]


@dataclass(frozen=True)
class Slice:
    """Output layers made from the same number of layers of each source."""

    sources: tuple[SliceSource, ...]
    params: dict[str, Setting] = field(default_factory=dict)
    base: str | None = None  # this slice's base, instead of the recipe's

    @property
    def length(self) -> int:
        return self.sources[0].length


@dataclass(frozen=True)
class Origin:
    """Where an output tensor comes from: its slice (None: the models whole), its place in the
    layers (t, `settings.position`) and its name in the model it is read from."""

    slice: int | None
    t: float
    name: str


class SliceView(Checkpoint):
    """The tensors one position of every slice reads, under the output's names."""

    def __init__(self, label: str, sources: dict[str, tuple[Checkpoint, str, Origin]], config: ModelConfig | None):
        super().__init__(Path(label), config)
        self.sources = sources
        self.read_ahead = any(c.read_ahead for c, _, _ in sources.values())
        self._view_infos = {out: replace(ckpt.info(name), name=out) for out, (ckpt, name, _) in sources.items()}

    @property
    def folder(self) -> Path | None:
        return None

    @property
    def _infos(self) -> dict[str, TensorInfo]:
        return self._view_infos

    def origin(self, name: str) -> Origin:
        return self.sources[name][2]

    def formed_whole(self, name: str) -> bool:
        ckpt, source, _ = self.sources[name]
        return ckpt.formed_whole(source)

    def get(
        self, name: str, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        ckpt, source, _ = self.sources[name]
        self.bytes_read += self.info(name).nbytes
        return ckpt.get(source, device, dtype)

    def get_rows(
        self,
        name: str,
        start: int,
        stop: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        into: torch.Tensor | None = None,
    ) -> torch.Tensor:
        ckpt, source, _ = self.sources[name]
        rows = ckpt.get_rows(source, start, stop, device, dtype, into)
        self.bytes_read += rows.numel() * rows.element_size()
        return rows


def _layers_of(ckpt: Checkpoint) -> dict[int, list[str]]:
    found: dict[int, list[str]] = {}
    for name in ckpt.names():
        index = layer_index(name)
        if index is not None:
            found.setdefault(index, []).append(name)
    return found


def slice_views(
    slices: list[Slice], base: str | None, uses_base: bool, opened: dict[str, Checkpoint]
) -> tuple[SliceView | None, list[SliceView], int]:
    """The base's view (None when the method takes no base) and one view per other position of the
    slices, and the output's layer count. Every slice has the same number of sources, the base
    among them when the method uses one; each source's layers exist in its model."""
    counts = {len(s.sources) for s in slices}
    if len(counts) > 1:
        raise InvalidArgument(
            f"the slices have different numbers of sources ({sorted(counts)}): weightlab merges slices of one shape"
        )
    positions: list[tuple[int | None, list[int]]] = []
    for i, s in enumerate(slices):
        names = [src.model for src in s.sources]
        chosen = s.base or base
        if uses_base:
            if chosen is None:
                raise InvalidArgument(f"slices[{i}]: the method needs a base_model among the slice's sources")
            if chosen not in names:
                raise InvalidArgument(f"slices[{i}]: the base_model {chosen} is not among the slice's sources")
            at = names.index(chosen)
            positions.append((at, [j for j in range(len(names)) if j != at]))
        else:
            positions.append((None, list(range(len(names)))))
        if len({src.length for src in s.sources}) > 1:
            raise InvalidArgument(f"slices[{i}]: every source must span the same number of layers")
    layers = {src.model: _layers_of(opened[src.model]) for s in slices for src in s.sources}
    for i, s in enumerate(slices):
        for src in s.sources:
            start, stop = src.layers
            missing = [j for j in range(start, stop) if j not in layers[src.model]]
            if start < 0 or stop <= start or missing:
                raise InvalidArgument(
                    f"slices[{i}]: layer_range [{start}, {stop}] is not a range of the model's layers "
                    f"(it has {len(layers[src.model])})",
                    src.model,
                )
    n_views = len(positions[0][1])
    mappings: list[dict[str, tuple[Checkpoint, str, Origin]]] = [{} for _ in range(n_views + 1)]  # 0: the base
    out_layer = 0
    for i, s in enumerate(slices):
        order, has_base = _order(positions[i]), positions[i][0] is not None
        for k in range(s.length):
            t = position(k, s.length)
            for slot, j in enumerate(order):
                src = s.sources[j]
                ckpt = opened[src.model]
                for name in layers[src.model][src.layers[0] + k]:
                    target = mappings[slot if has_base else slot + 1]
                    target[renumbered(name, out_layer)] = (ckpt, name, Origin(i, t, name))
            out_layer += 1
    for i, edge in ((0, True), (len(slices) - 1, False)):
        order, has_base = _order(positions[i]), positions[i][0] is not None
        for slot, j in enumerate(order):
            ckpt = opened[slices[i].sources[j].model]
            for name in ckpt.names():
                if layer_index(name) is None and before_layers(name) == edge:
                    mappings[slot if has_base else slot + 1][name] = (ckpt, name, Origin(i, 0.0, name))
    anchor = opened[slices[0].sources[positions[0][0] if positions[0][0] is not None else 0].model]
    config = layered_config(anchor.config, out_layer)
    views = [SliceView(f"slices, position {j}", m, config) for j, m in enumerate(mappings)]
    base_view = views[0] if positions[0][0] is not None else None
    return base_view, views[1:], out_layer


def _order(positions: tuple[int | None, list[int]]) -> list[int]:
    """A slice's sources in view order: the base's first (when there is one), then the others."""
    at, others = positions
    return ([at] if at is not None else []) + others


def layered_config(config: ModelConfig | None, layers: int) -> ModelConfig | None:
    """A model's config with its layer count set to `layers` (every key that holds one)."""
    if config is None or not config.raw:
        return config
    raw: dict[str, Any] = dict(config.raw)
    for key in LAYER_COUNT_KEYS:
        if isinstance(raw.get(key), int):
            raw[key] = layers
    return model_config_from_dict(raw)
