"""Rich tables for the terminal."""

from __future__ import annotations

import re
from collections.abc import Sequence

from rich.table import Table
from rich.text import Text

from weightlab.display import fmt

_LAYER_PREFIX = re.compile(r"^.*?(?:layers|layer|h|blocks|block)\.\d+\.")


CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def one_line(text: str) -> str:
    """`text` with every control character (a newline in a file name...) written as an escape,
    so that a message or a table cell stays one line whatever the names in it hold."""
    return CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


def short_name(name: str, width: int = 38, drop_layer: bool = False) -> str:
    """Name without `.weight` (and without the layer prefix when a layer column shows it)."""
    name = name.removesuffix(".weight")
    if drop_layer:
        name = _LAYER_PREFIX.sub("", name)
    return name if len(name) <= width else "…" + name[-(width - 1) :]


def human_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


NAME_WIDTH = 44  # characters of a tensor name in the terminal (the report shows them whole)


def table(
    title: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[object]],
    numeric_from: int = 1,
    caption: str | None = None,
) -> Table:
    """A table whose columns from `numeric_from` on are right-aligned numbers."""
    t = Table(
        title=Text(one_line(title)),
        caption=Text(one_line(caption)) if caption else None,
        header_style="bold cyan",
        title_style="bold",
        show_lines=False,
    )
    for i, col in enumerate(columns):
        if i == 0:
            t.add_column(col, overflow="fold", min_width=16, ratio=1)
        else:
            t.add_column(col, justify="right" if i >= numeric_from else "left", no_wrap=True)
    for row in rows:
        t.add_row(*(Text(one_line(fmt(v))) for v in row))  # data, never markup
    return t
