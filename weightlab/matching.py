"""Align tensors of several checkpoints by name, despite wrapper prefixes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from weightlab.io.checkpoint import Checkpoint
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


@dataclass
class Matching:
    matched: list[MatchedTensor]
    unmatched: dict[str, list[str]] = field(default_factory=dict)  # checkpoint path -> names only it has
    shape_mismatches: list[tuple[str, tuple[tuple[int, ...], ...]]] = field(default_factory=list)

    def describe_problems(self) -> list[str]:
        lines = []
        for path, names in self.unmatched.items():
            if names:
                shown = ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")
                lines.append(f"{len(names)} tensors only in {path}: {shown}")
        for key, shapes in self.shape_mismatches:
            lines.append(f"shape mismatch for {key}: " + " vs ".join(str(list(s)) for s in shapes))
        return lines


def match_checkpoints(checkpoints: Sequence[Checkpoint]) -> Matching:
    """Tensors common to all checkpoints, in the first checkpoint's order."""
    keyed = []
    for ckpt in checkpoints:
        by_key: dict[str, str] = {}
        for name in ckpt.names():
            by_key.setdefault(canonical_name(name), name)
        keyed.append(by_key)
    matching = Matching(matched=[])
    common = set.intersection(*(set(k) for k in keyed))
    for ckpt, by_key in zip(checkpoints, keyed):
        matching.unmatched[str(ckpt.path)] = [n for k, n in by_key.items() if k not in common]
    for key, first in keyed[0].items():
        if key not in common:
            continue
        names = tuple(by_key[key] for by_key in keyed)
        shapes = tuple(tuple(c.info(n).shape) for c, n in zip(checkpoints, names))
        if len(set(shapes)) > 1:
            matching.shape_mismatches.append((key, shapes))
            continue
        matching.matched.append(MatchedTensor(key, names, shapes[0], layer_index(first), module_role(first),
                                              checkpoints[0].info(first).dtype))
    return matching

