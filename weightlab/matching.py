"""Align tensors of several checkpoints by name, despite wrapper prefixes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from weightlab.errors import InvalidArgument
from weightlab.io.checkpoint import Checkpoint
from weightlab.io.safetensors_file import DTYPES
from weightlab.naming import canonical_name, layer_index, module_role


@dataclass(frozen=True)
class MatchedTensor:
    """One tensor present, with the same shape, in every checkpoint."""

    key: str  # canonical name
    names: tuple[str, ...]  # its name in each checkpoint, in order
    shape: tuple[int, ...]
    layer: int | None
    role: str
    dtype: str  # safetensors code in the first checkpoint

    @property
    def is_float(self) -> bool:
        return self.dtype.startswith(("F", "BF"))

    @property
    def nbytes(self) -> int:
        """Bytes it holds in the first checkpoint (4 per entry for a dtype that is not read)."""
        return math.prod(self.shape) * DTYPES.get(self.dtype, ("", 4))[1]


@dataclass
class Matching:
    matched: list[MatchedTensor]
    unmatched: dict[str, list[str]] = field(default_factory=dict)  # checkpoint path -> names only it has
    shape_mismatches: list[tuple[str, tuple[tuple[int, ...], ...]]] = field(default_factory=list)
    missing: dict[str, list[str]] = field(default_factory=dict)  # a tensor some have -> the paths that lack it

    def describe_problems(self) -> list[str]:
        """One line per group of tensors left out for the same reason, naming the models that lack them."""
        groups: dict[tuple[str, ...], list[str]] = {}
        for name, lacking in self.missing.items():
            groups.setdefault(tuple(lacking), []).append(name)
        lines = [
            f"{_count(names, 'tensor')} missing from {', '.join(lacking)}, so left out for every model: {_shown(names)}"
            for lacking, names in groups.items()
        ]
        for key, shapes in self.shape_mismatches:
            lines.append(f"shape mismatch for {key}: " + " vs ".join(str(list(s)) for s in shapes))
        return lines


def _count(items: Sequence[object], noun: str) -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"


def _shown(names: Sequence[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def match_checkpoints(checkpoints: Sequence[Checkpoint]) -> Matching:
    """Tensors common to all checkpoints, in the first checkpoint's order. A checkpoint that shares
    no tensor with the first is refused: it is of another model, and nothing could be compared."""
    keyed = []
    for ckpt in checkpoints:
        by_key: dict[str, str] = {}
        for name in ckpt.names():
            by_key.setdefault(canonical_name(name), name)
        keyed.append(by_key)
    for ckpt, by_key in zip(checkpoints[1:], keyed[1:]):
        if keyed[0] and by_key and not keyed[0].keys() & by_key.keys():
            raise InvalidArgument(
                f"shares no tensor name with {checkpoints[0].path}; is it of another model?", ckpt.path
            )
    matching = Matching(matched=[])
    common = set.intersection(*(set(k) for k in keyed))
    for ckpt, by_key in zip(checkpoints, keyed):
        matching.unmatched[str(ckpt.path)] = [n for k, n in by_key.items() if k not in common]
    for key in dict.fromkeys(k for by_key in keyed for k in by_key if k not in common):
        name = next(by_key[key] for by_key in keyed if key in by_key)
        matching.missing[name] = [str(c.path) for c, by_key in zip(checkpoints, keyed) if key not in by_key]
    for key, first in keyed[0].items():
        if key not in common:
            continue
        names = tuple(by_key[key] for by_key in keyed)
        shapes = tuple(tuple(c.info(n).shape) for c, n in zip(checkpoints, names))
        if len(set(shapes)) > 1:
            matching.shape_mismatches.append((key, shapes))
            continue
        matching.matched.append(
            MatchedTensor(
                key, names, shapes[0], layer_index(first), module_role(first), checkpoints[0].info(first).dtype
            )
        )
    return matching
