"""How values read for people, in one place: a model by its folder name or Hub ID (never by its
position on the command line; equal names get as much of their path as tells them apart), and
numbers by one formatter (the same significant digits in every table, card and line)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import PurePath

DIGITS = 3  # significant digits of every number shown to a person


IN_MEMORY = " (in memory)"  # how io.memory labels a model held in memory
HUB_SNAPSHOT = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/(?P<commit>[0-9a-f]{7})[0-9a-f]*/?$")


def _parts(path: str) -> list[str]:
    """Components of a path or Hub ID, last first, without a weights file's name; a Hub cache
    snapshot reads as its ID, `org/name@commit`; a model in memory by its label without "(in memory)"."""
    path = path.removesuffix(IN_MEMORY)
    hub = HUB_SNAPSHOT.search(path)
    if hub:
        return [f"{hub['org']}/{hub['name']}@{hub['commit']}"]
    pure = PurePath(path)
    parts = [p for p in pure.parts if p not in ("/", "")]
    if parts and pure.suffix in (".safetensors", ".bin", ".pt", ".pth", ".json"):
        stem = pure.stem
        parts = parts[:-1] + (
            [stem] if stem not in ("model", "pytorch_model", "adapter_model") or len(parts) == 1 else []
        )
    return list(reversed(parts)) or [path]


def model_names(paths: Sequence[str]) -> list[str]:
    """A short name per model: the last path component (or the Hub ID, `org/name@rev`), with as
    many parent folders as make it unique among `paths`; a repeated path gets `#2`, `#3`."""
    parts = [_parts(str(p)) for p in paths]
    depth = [1] * len(paths)
    while True:
        names = ["/".join(reversed(p[:d])) for p, d in zip(parts, depth)]
        clashes = {n for n in names if names.count(n) > 1}
        grow = [i for i, n in enumerate(names) if n in clashes and depth[i] < len(parts[i])]
        if not grow:
            break
        for i in grow:
            depth[i] += 1
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name} #{seen[name]}")
    return out


def described(paths: Sequence[str]) -> list[str]:
    """Each model's short name with where it is, "name (path)", once where the two say the same
    ("animal (in memory)")."""
    return [p if p in (name, name + IN_MEMORY) else f"{name} ({p})" for name, p in zip(model_names(paths), paths)]


def human_bytes(n: float) -> str:
    """A size for people: 512 B, 97.7 KB, 13.5 GB (powers of 1000)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n}"


def fmt(value: object, digits: int = DIGITS) -> str:
    """A value as a person reads it: floats to `digits` significant digits with their trailing
    zeros (0.500, 1.00, 0.688: a column reads alike), large integers with thousands separators,
    None as "-", NaN as "not computed" (a figure that has no value is never shown as a number),
    infinities as ∞ and −∞."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if not math.isfinite(value):
        return "not computed" if math.isnan(value) else ("∞" if value > 0 else "−∞")
    text = f"{value:#.{digits}g}"
    return text[:-1] if text.endswith(".") else text
