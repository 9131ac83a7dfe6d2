"""Rich tables for the terminal."""

from __future__ import annotations

from typing import Sequence

from rich.table import Table


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n}"


def human_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def fmt(value: object, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:
            return "nan"
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.3e}"
    return str(value)


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]], numeric_from: int = 1,
          caption: str | None = None) -> Table:
    """A table whose columns from `numeric_from` on are right-aligned numbers."""
    t = Table(title=title, caption=caption, header_style="bold cyan", title_style="bold", show_lines=False)
    for i, col in enumerate(columns):
        t.add_column(col, justify="right" if i >= numeric_from else "left", no_wrap=i == 0, overflow="fold")
    for row in rows:
        t.add_row(*(fmt(v) for v in row))
    return t
