"""Results in a notebook: a result's report section as HTML (`Result._repr_html_`) and its plots
as matplotlib figures (`Result.plot()`), from the same code as `--report` and `--plots`."""

from __future__ import annotations

import base64
import io
import tempfile
from pathlib import Path
from typing import Any

from weightlab.report.document import section, section_html
from weightlab.report.plots import figures as draw_figures
from weightlab.results import Result

ROWS = 50  # rows of the main table shown under a result; all are in to_pandas()

# the report's look, scoped to the result so the notebook's own page keeps its style
CSS = """
.weightlab-result{font:14px/1.5 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;color:#1d2330}
.weightlab-result section{border:1px solid #e3e6eb;border-radius:10px;padding:12px 16px;margin:8px 0}
.weightlab-result h3{margin:0 0 4px;font-size:17px}.weightlab-result .ref{color:#6b7380;font-size:12px}
.weightlab-result .cards{display:flex;flex-wrap:wrap;gap:10px;margin:8px 0}
.weightlab-result .card{background:#f1f4f9;border-radius:8px;padding:6px 12px;min-width:140px}
.weightlab-result .card .v{font-size:18px;font-weight:600}
.weightlab-result .card .v.none{font-size:14px;font-weight:400;color:#8a93a0;font-style:italic}
.weightlab-result .card .k{font-size:12px;color:#5b6472}
.weightlab-result img{max-width:100%;margin:6px 0}.weightlab-result .note{color:#5b6472;font-size:12px}
.weightlab-result .scroll{max-height:360px;overflow:auto}
.weightlab-result table{border-collapse:collapse;font-size:12px}
.weightlab-result th,.weightlab-result td{padding:3px 8px;border-bottom:1px solid #edf0f3;text-align:right}
.weightlab-result th:first-child,.weightlab-result td:first-child{text-align:left}
"""


def result_html(result: Result, max_rows: int = ROWS) -> str:
    """The result's report section (headline cards, plots embedded, main table), self-contained."""
    with tempfile.TemporaryDirectory() as folder:
        s = section(result, Path(folder))
        body = section_html(s, "weightlab", max_rows, heading="h3", cards=True)  # images embedded before cleanup
    return f"<div class='weightlab-result'><style>{CSS}</style>{body}</div>"


class Figures(list):  # type: ignore[type-arg]
    """A result's matplotlib figures; a notebook shows them all when this is a cell's value."""

    def _repr_html_(self) -> str:
        return "".join(f"<img src='data:image/png;base64,{_png(fig)}' style='max-width:100%'>" for fig in self)


def _png(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def figures(result: Result) -> Figures:
    return Figures(draw_figures(result))
