"""Group per-matrix results by layer, role or any other key, in one place for every analysis."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


def _order(key: tuple) -> tuple:
    """None (embeddings, head: no layer) after the numbered layers; numbers before text."""
    return tuple((v is None, isinstance(v, str), v if v is not None else 0) for v in key)


def group_summary(
    items: Sequence[T], keys: dict[str, Callable[[T], object]], metrics: dict[str, Callable[[list[T]], object]]
) -> list[dict]:
    """One row per distinct key tuple, in layer order: the key values, then each metric of the group."""
    groups: dict[tuple, list[T]] = {}
    for item in items:
        groups.setdefault(tuple(f(item) for f in keys.values()), []).append(item)
    return [
        {**dict(zip(keys, key)), **{name: metric(groups[key]) for name, metric in metrics.items()}}
        for key in sorted(groups, key=_order)
    ]


def total(value: Callable[[T], float | None]) -> Callable[[list[T]], float | None]:
    """The sum of `value` over a group, skipping None; None when every value is None (a figure
    that was not computed is no zero)."""

    def of(group: list[T]) -> float | None:
        values = [v for v in map(value, group) if v is not None]
        return sum(values) if values else None

    return of


def mean(value: Callable[[T], float | None]) -> Callable[[list[T]], float | None]:
    """The mean of `value` over a group, skipping None (None when every value is None)."""

    def of(group: list[T]) -> float | None:
        values = [v for v in map(value, group) if v is not None]
        return sum(values) / len(values) if values else None

    return of
