"""One self-contained report (HTML, plots embedded, no network) and its Markdown twin, from the
results of any weightlab command: sections come from the `Result` protocol, not per type."""

from __future__ import annotations

import base64
import html
import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from weightlab.display import fmt
from weightlab.errors import CheckpointNotFound, InvalidArgument
from weightlab.io.atomic import atomic_path
from weightlab.report.catalog import known_schemas, result_type
from weightlab.report.tables import one_line, short_name
from weightlab.results import Result


@dataclass
class Section:
    title: str
    reference: str
    headline: list[tuple[str, str, Any]]  # (data key, label, value): the few numbers a person wants first
    images: list[Path] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    rows: list[list[Any]] = field(default_factory=list)
    note: str = ""


# ---- one section per result, whatever its type --------------------------------------------


def section(result: Result, plots: Path, images: list[Path] | None = None) -> Section:
    """The report section of any result: its headline, plots (drawn into `plots` unless `images`
    already holds them) and main table."""
    from weightlab.report.plots import draw  # matplotlib, only when a report is drawn

    tables = result.tables()
    main = tables[0] if tables else None
    return Section(
        result.title(),
        result.REFERENCE,
        result.headline(),
        images if images is not None else draw(result, plots),
        main.columns if main else [],
        main.rows if main else [],
        result.note(),
    )


def sections_for(results: list[Result], plots: Path, drawn: dict[str, list[Path]] | None = None) -> list[Section]:
    """Sections in the results' report order; each result's plots in its own folder, or those
    already drawn for it (`drawn`, by folder name: spectrum, angles, …)."""
    out, used = [], set()
    for result in sorted(results, key=lambda r: r.ORDER):
        name = result.SCHEMA.split("/")[0].removeprefix("weightlab.")
        folder = name if name not in used else f"{name}-{len(used)}"
        used.add(folder)
        out.append(section(result, plots / folder, (drawn or {}).get(folder)))
    return out


def result_files(paths: list[Path]) -> list[Path]:
    """The JSON files named, and every `*.json` inside the folders named."""
    files = []
    for path in map(Path, paths):
        if not path.exists():
            raise CheckpointNotFound("no such file or folder", path)
        files.extend(sorted(path.rglob("*.json")) if path.is_dir() else [path])
    return files


def parse_result(data: object, where: Path | str = "result") -> Result:
    """The typed result a JSON payload holds, by its schema; InvalidArgument when it does not fit."""
    cls = result_type(data.get("schema") if isinstance(data, dict) else None)
    if cls is None:
        raise InvalidArgument(f"not a weightlab result (no known 'schema'; known: {', '.join(known_schemas())})", where)
    try:
        return cls.from_dict(data)
    except (InvalidArgument, KeyError, TypeError, ValueError, IndexError, AttributeError) as e:  # hand-edited JSON
        detail = (
            f"missing field {e}"
            if isinstance(e, KeyError)
            else (e.message if isinstance(e, InvalidArgument) else str(e)).splitlines()[0][:120]
        )
        raise InvalidArgument(f"result does not match {cls.SCHEMA} ({detail})", where) from e


def load_results(paths: list[Path]) -> list[Result]:
    """Results by file, or every known result in a folder (e.g. the demo's output): in a folder,
    JSON files that are no weightlab result are passed over; named, they are an error."""
    results = []
    for path in map(Path, paths):
        named = not path.is_dir()
        for file in result_files([path]):
            try:
                data = json.loads(file.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, OSError) as e:
                if named:
                    raise InvalidArgument(f"not a JSON result ({e.__class__.__name__})", file) from None
                continue
            if named or result_type(data.get("schema") if isinstance(data, dict) else None) is not None:
                results.append(parse_result(data, file))
    if not results:
        raise InvalidArgument("no weightlab results found in " + ", ".join(map(str, paths)))
    return results


# ---- rendering ------------------------------------------------------------------------------

CSS = """
body{font:15px/1.5 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
header{background:#1d2330;color:#fff;padding:22px 36px}header h1{margin:0;font-size:24px}
header p{margin:4px 0 0;color:#b8c0cc}main{max-width:1200px;margin:0 auto;padding:18px 36px 48px}
section{background:#fff;border:1px solid #e3e6eb;border-radius:10px;padding:18px 22px;margin:18px 0}
h2{margin:0 0 4px;font-size:19px}.ref{color:#6b7380;font-size:13px;margin-bottom:12px}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:10px 0 14px}
.card{background:#f1f4f9;border-radius:8px;padding:8px 14px;min-width:150px}
.card .v{font-size:20px;font-weight:600;word-break:break-all}
.card .v.none{font-size:15px;font-weight:400;color:#8a93a0;font-style:italic}
.card .k{font-size:12px;color:#5b6472}
img{max-width:100%;border:1px solid #eef0f3;border-radius:6px;margin:8px 0}
table{border-collapse:collapse;width:100%;font-size:13px;margin-top:10px}
th,td{padding:4px 8px;border-bottom:1px solid #edf0f3;text-align:right}
th:first-child,td:first-child{text-align:left}
th{cursor:pointer;background:#fafbfc;position:sticky;top:0;user-select:none}
th:hover{background:#eef2f8}.note{color:#5b6472;font-size:13px}
h3{font-size:15px;margin:14px 0 0}h3 a{color:#1d2330;text-decoration:none}
.scroll{max-height:460px;overflow:auto;border:1px solid #edf0f3;border-radius:6px}
"""

SCRIPT = """
(function(){
  var errors=[];window.addEventListener('error',function(e){errors.push(String(e.message||'resource error'));},true);
  document.querySelectorAll('th').forEach(function(th){th.addEventListener('click',function(){
    var table=th.closest('table'),i=Array.prototype.indexOf.call(th.parentNode.children,th),body=table.tBodies[0];
    var asc=th.dataset.asc!=='1';th.dataset.asc=asc?'1':'0';
    var rows=Array.prototype.slice.call(body.rows);
    rows.sort(function(a,b){var x=a.cells[i].dataset.v,y=b.cells[i].dataset.v,nx=parseFloat(x),ny=parseFloat(y);
      var c=(!isNaN(nx)&&!isNaN(ny))?nx-ny:String(x).localeCompare(String(y));return asc?c:-c;});
    rows.forEach(function(r){body.appendChild(r);});});});
  window.addEventListener('load',function(){
    var imgs=document.images,ok=0;for(var j=0;j<imgs.length;j++){if(imgs[j].complete&&imgs[j].naturalWidth>0)ok++;}
    document.body.dataset.images=ok+'/'+imgs.length;document.body.dataset.errors=String(errors.length);
    document.body.dataset.ready='1';});
})();
"""


NOT_COMPUTED = "not computed"


def _value(v: Any) -> str:
    return fmt(v)


def _headline_value(v: Any) -> str:
    """A headline figure: None is a figure that was not computed, and says so (never 0 or a dash)."""
    return NOT_COMPUTED if v is None else _value(v)


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def cards_html(s: Section) -> str:
    """A section's headline figures as cards (a figure not computed says so)."""
    e = html.escape
    return (
        "<div class='cards'>"
        + "".join(
            f"<div class='card'><div class='v{' none' if value is None else ''}' data-key='{e(key)}' "
            f"data-v='{e(str(value))}'>{e(_headline_value(value))}</div><div class='k'>{e(label)}</div></div>"
            for key, label, value in s.headline
        )
        + "</div>"
    )


def section_html(s: Section, anchor: str, max_rows: int, heading: str = "h2", cards: bool = False) -> str:
    """One section: title, reference, (its headline cards,) plots (embedded), note and main table
    (its first `max_rows` rows)."""
    e = html.escape
    parts = [f"<section id='{anchor}'><{heading}>{e(s.title)}</{heading}><div class='ref'>{e(s.reference)}</div>"]
    if cards:
        parts.append(cards_html(s))
    for image in s.images:
        parts.append(f"<img alt='{e(image.stem.replace('_', ' '))}' src='{_data_uri(image)}'>")
    if s.note:
        parts.append(f"<p class='note'>{e(s.note)}</p>")
    if s.rows:
        parts.append(
            "<div class='scroll'><table><thead><tr>"
            + "".join(f"<th>{e(c)}</th>" for c in s.columns)
            + "</tr></thead><tbody>"
        )
        for row in s.rows[:max_rows]:
            parts.append("<tr>" + "".join(f"<td data-v='{e(str(v))}'>{e(_value(v))}</td>" for v in row) + "</tr>")
        parts.append("</tbody></table></div>")
        if len(s.rows) > max_rows:
            parts.append(f"<p class='note'>{len(s.rows) - max_rows} more rows in the JSON result.</p>")
    parts.append("</section>")
    return "".join(parts)


def render_html(title: str, sections: list[Section], max_rows: int = 500) -> str:
    e = html.escape
    parts = [
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{e(title)}</title>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<style>{CSS}</style></head><body><header><h1>{e(title)}</h1>",
        "<p>weightlab report: what changed, and where</p></header><main>",
    ]
    parts.append("<section class='summary'><h2>Summary</h2>")
    for i, s in enumerate(sections):
        parts.append(f"<h3><a href='#s{i}'>{e(s.title)}</a></h3>{cards_html(s)}")
    parts.append("</section>")
    parts.extend(section_html(s, f"s{i}", max_rows) for i, s in enumerate(sections))
    parts.append(f"</main><script>{SCRIPT}</script></body></html>")
    return "".join(parts)


MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]|~])")


def md(value: Any) -> str:
    """A data string (a tensor name, a path, a value) for Markdown: one line, HTML's `&<>` as
    entities and Markdown's own punctuation escaped, so no name can break a table or inject markup."""
    text = html.escape(one_line(str(value)), quote=False)
    return MARKDOWN_SPECIAL.sub(r"\\\1", text)


def render_markdown(title: str, sections: list[Section], assets: str, max_rows: int = 30) -> str:
    lines = [f"# {md(title)}", "", "| analysis | quantity | value |", "|---|---|---|"]
    for s in sections:
        lines += [f"| {md(s.title)} | {md(label)} | {md(_headline_value(value))} |" for _, label, value in s.headline]
    for s in sections:
        lines += ["", f"## {md(s.title)}", "", f"_{md(s.reference)}_", ""]
        lines += [f"![{md(image.stem)}]({quote(f'{assets}/{image.parent.name}_{image.name}')})" for image in s.images]
        if s.note:
            lines += ["", md(s.note)]
        if s.rows:
            lines += ["", "| " + " | ".join(md(c) for c in s.columns) + " |", "|" + "---|" * len(s.columns)]
            lines += [
                "| " + " | ".join(md(_value(short_name(v, 60) if isinstance(v, str) else v)) for v in row) + " |"
                for row in s.rows[:max_rows]
            ]
    return "\n".join(lines) + "\n"


def assets_folder(markdown: str | Path) -> Path:
    """Where the Markdown report's PNGs go: `<name>_assets/` beside it."""
    md = Path(markdown)
    return md.with_name(md.stem + "_assets")


def write_report(
    results: list[Result],
    out: str | Path,
    *,
    title: str = "weightlab report",
    markdown: str | Path | None = None,
    assets: str | Path | None = None,
    force: bool = False,
    drawn: dict[str, list[Path]] | None = None,
) -> list[Section]:
    """Build the sections (drawing the plots from the results, except those in `drawn`) and write
    the HTML file, and with `markdown` a Markdown file plus its PNGs in `assets` (default
    `<name>_assets/` beside it)."""
    with tempfile.TemporaryDirectory(prefix="weightlab-report-") as tmp:
        sections = sections_for(results, Path(tmp), drawn)
        with atomic_path(out, force) as path:
            path.write_text(render_html(title, sections))
        if markdown:
            md = Path(markdown)
            assets = Path(assets) if assets is not None else assets_folder(md)
            with atomic_path(assets, force, directory=True) as folder:
                for s in sections:
                    for image in s.images:
                        (folder / f"{image.parent.name}_{image.name}").write_bytes(image.read_bytes())
            with atomic_path(md, force) as path:
                path.write_text(render_markdown(title, sections, assets.name))
    return sections
