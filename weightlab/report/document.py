"""One self-contained report (HTML, plots embedded, no network) and its Markdown twin, from the
JSON results of any weightlab command."""

from __future__ import annotations

import base64
import html
import json
import math
import tempfile
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable

from weightlab.errors import CheckpointNotFound, InvalidArgument
from weightlab.io.atomic import atomic_path
from weightlab.report.tables import fmt, short_name


@dataclass
class Section:
    title: str
    reference: str
    headline: list[tuple[str, str, Any]]  # (data key, label, value): the few numbers a person wants first
    images: list[Path] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    rows: list[list[Any]] = field(default_factory=list)
    note: str = ""


# ---- rebuilding typed results from their JSON, so the plots can be drawn again -------------

def from_dict(cls, data, where: str = "result"):
    """A dataclass instance (nested dataclasses and lists of them included) from its asdict(),
    with every field present and of its declared type; else InvalidArgument naming the field."""
    if not isinstance(data, dict):
        raise InvalidArgument(f"{where} is not an object")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in fields(cls):
        if f.name not in data:
            if f.default is MISSING and f.default_factory is MISSING:
                raise InvalidArgument(f"{where}.{f.name} is missing")
            continue
        kwargs[f.name] = _convert(hints[f.name], data[f.name], f"{where}.{f.name}")
    return cls(**kwargs)


def _convert(hint, value, where: str):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if is_dataclass(hint):
        return from_dict(hint, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise InvalidArgument(f"{where} is not a list")
        return [_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)] if args else value
    if hint is float:
        if value is None:
            return float("nan")  # JSON has no NaN: our writer stores it as null
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint in (str, bool, dict):
        ok = isinstance(value, hint)
    else:
        ok = True
    if not ok:
        raise InvalidArgument(f"{where} should be {getattr(hint, '__name__', hint)}, got {type(value).__name__}")
    return value


# ---- one section per kind of result ---------------------------------------------------------

def _spectrum(payload: dict, plots: Path) -> Section:
    from weightlab.analysis.spectrum import MatrixSpectrum, SpectrumOptions, SpectrumResult
    from weightlab.report.plots import spectrum_plots

    matrices = _convert(list[MatrixSpectrum], payload["matrices"], "matrices")
    result = SpectrumResult(payload["base"], payload["finetuned"], from_dict(SpectrumOptions, payload["options"]), matrices)
    images = spectrum_plots(result, plots / "spectrum")
    top = max(matrices, key=lambda m: m.relative_change) if matrices else None
    by_role = max(payload["summary_by_role"], key=lambda s: s["relative_change"]) if matrices else {}
    headline = [
        ("spectrum.matrices", "matrices analysed", len(matrices)),
        ("spectrum.mean_relative_change", "mean ‖ΔW‖/‖W‖",
         sum(m.relative_change for m in matrices) / len(matrices) if matrices else None),
        ("spectrum.most_changed", "most changed matrix", top.name if top else "-"),
        ("spectrum.most_changed_role", "most changed role", by_role.get("role", "-")),
        ("spectrum.intruders", "intruder dimensions", sum(len(m.intruders) for m in matrices)),
    ]
    rows = [[m.name, m.finetuned, m.layer, m.role, m.relative_change, m.amplification[0], m.topk_change_share,
             m.delta_rank90, m.u_alignment[0], m.subspace_similarity, len(m.intruders)]
            for m in sorted(matrices, key=lambda m: -m.relative_change)]
    return Section("Spectrum: what fine-tuning did to each matrix",
                   "Si et al. 2025 (spectra); Shuttleworth et al. 2024 (intruder dimensions)", headline, images,
                   ["matrix", "fine-tune", "layer", "role", "‖ΔW‖/‖W‖", "σ'₁/σ₁", "top-k share", "rank90 ΔW",
                    "|u'₁·u₁|", "φ", "intruders"], rows,
                   "Fine-tunes: " + ", ".join(f"{i}: {p}" for i, p in enumerate(payload["finetuned"])))


def _angles(payload: dict, plots: Path) -> Section:
    from weightlab.analysis.angles import AnglesOptions, AnglesResult, MatrixAngles
    from weightlab.report.plots import angles_plots

    matrices = _convert(list[MatrixAngles], payload["matrices"], "matrices")
    result = AnglesResult(payload["a"], payload["b"], payload["base"], from_dict(AnglesOptions, payload["options"]), matrices)
    images = angles_plots(result, plots / "angles")
    mean = sum(m.mean_angle for m in matrices) / len(matrices) if matrices else None
    closest = min(matrices, key=lambda m: m.mean_angle) if matrices else None
    headline = [("angles.mean_angle_deg", "mean principal angle (°)", mean),
                ("angles.most_aligned", "most aligned matrix", closest.name if closest else "-"),
                ("angles.matrices", "matrices compared", len(matrices))]
    rows = [[m.name, m.layer, m.role, m.side, m.k, m.mean_angle, m.angles_deg[0], m.angles_deg[-1], m.overlap]
            for m in sorted(matrices, key=lambda m: m.mean_angle)]
    what = "task vectors" if payload["base"] else "weights"
    return Section(f"Principal angles between the {what} of A and B", "Björck & Golub 1973; Knyazev & Argentati 2002",
                   headline, images, ["matrix", "layer", "role", "side", "k", "mean °", "min °", "max °", "mean cos²"],
                   rows, f"A = {payload['a']}, B = {payload['b']}" + (f", base = {payload['base']}" if payload["base"] else ""))


def _gaussian(payload: dict, plots: Path) -> Section:
    from weightlab.analysis.gaussian import DepthTrend, GaussianOptions, GaussianResult, TensorGaussianity
    from weightlab.report.plots import gaussian_plots

    tensors = _convert(list[TensorGaussianity], payload["tensors"], "tensors")
    trend = payload.get("depth_trend")
    result = GaussianResult(payload["checkpoint"], payload["base"], from_dict(GaussianOptions, payload["options"]), tensors,
                            from_dict(DepthTrend, {k: v for k, v in trend.items() if k != "grows_with_depth"}) if trend else None)
    images = gaussian_plots(result, None, None, plots / "gaussian")
    counts = payload["label_counts"]
    headline = [("gaussian.tensors", "tensors tested", len(tensors)),
                ("gaussian.gaussian_share", "share labelled gaussian", counts["gaussian"] / len(tensors) if tensors else None)]
    if trend:
        headline.append(("gaussian.delta_std_slope", "std(ΔW) slope per layer", trend["slope"]))
    part = "delta" if payload["base"] else "weights"
    rows = [[t.name, t.layer, t.role, getattr(t, part).label, getattr(t, part).std, getattr(t, part).excess_kurtosis,
             getattr(t, part).skewness, getattr(t, part).qq_r2] for t in sorted(tensors, key=lambda t: getattr(t, part).qq_r2)]
    return Section("Gaussianity of " + ("the update ΔW" if payload["base"] else "the weights"),
                   "Si, Jiang, Shen 2025, Gaussian Distribution Never Fades", headline, images,
                   ["tensor", "layer", "role", "label", "std", "excess kurtosis", "skewness", "Q-Q R²"], rows,
                   "Labels: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


def _tsd(payload: dict, plots: Path) -> Section:
    from weightlab.analysis.tsd import MatrixTSD, TSDOptions, TSDResult
    from weightlab.report.plots import tsd_plots

    matrices = _convert(list[MatrixTSD], payload["matrices"], "matrices")
    result = TSDResult(payload["base"], payload["finetuned"], from_dict(TSDOptions, payload["options"]), matrices)
    images = tsd_plots(result, plots / "tsd")
    headline = [("tsd.matrices", "matrices", len(matrices)),
                ("tsd.median_percentile", "median TSD position (percentile, 0 = top σ)", payload.get("median_percentile"))]
    rows = [[m.name, m.layer, m.role, " ".join(map(str, m.indices)), m.rate[0] if m.rate else None, m.tsd_energy_share,
             m.core_energy_share] for m in sorted(matrices, key=lambda m: -m.delta_norm)]
    return Section("Task-specific directions", "Si et al. 2024, arXiv 2409.01035", headline, images,
                   ["matrix", "layer", "role", "TSD indices", "top δ", "TSD share of ‖ΔW‖²", "core share"], rows)


def _merge(payload: dict, plots: Path) -> Section:
    cfg = payload["config"]
    headline = [("merge.method", "method", cfg["method"]), ("merge.models", "models merged", len(cfg["models"])),
                ("merge.coefficients", "coefficients", ", ".join(f"{c:.4g}" for c in payload["coefficients"]))]
    rows = [[m, c] for m, c in zip(cfg["models"], payload["coefficients"])]
    per_layer = payload.get("coefficients_per_layer") or {}
    note = "Coefficients per layer: " + "; ".join(f"{k}: " + ", ".join(f"{c:.3f}" for c in v) for k, v in per_layer.items()) \
        if per_layer else f"parameters: {json.dumps(cfg['params'])}"
    detail = [cfg["method"]]
    if cfg.get("coeff") == "nan" and cfg.get("nan"):
        detail.append(f"NAN on {cfg['nan']['norm_of']}, per {cfg['nan']['granularity']}")
    detail += [f"{'λ' if k == 'lam' else k} {v:g}" for k, v in cfg["params"].items()]
    return Section(f"Merge: {', '.join(detail)}", "see docs/merge.md for each method's paper", headline, [],
                   ["model", "coefficient"], rows, note)


def _demo(payload: dict, plots: Path) -> Section:
    tasks = sorted({t for m in payload["merge"].values() for t in m["accuracy"]})
    headline = [(f"demo.merge.{label}", f"merged, {label}: accuracy " + " / ".join(tasks),
                 " / ".join(f"{m['accuracy'][t]:.2f}" for t in tasks)) for label, m in payload["merge"].items()]
    rows = [[label, *(m["accuracy"][t] for t in tasks), ", ".join(f"{c:.3f}" for c in m["coefficients"])]
            for label, m in payload["merge"].items()]
    before = ", ".join(f"{k} {ft['accuracy']['before']:.2f} → {ft['accuracy']['after']:.2f}"
                       for k, ft in payload["fine_tunes"].items())
    return Section("The demo: brief fine-tunes of all-MiniLM-L6-v2, and their merges", "docs/demo.md", headline, [],
                   ["merge", *(f"{t} accuracy" for t in tasks), "coefficients"], rows,
                   f"Test accuracy of each fine-tune, before → after (fresh head): {before}. Each merged encoder is scored with "
                   "each task's own trained head; every variant is listed.")


ORDER = ["weightlab.demo/1", "weightlab.spectrum/1", "weightlab.angles/1", "weightlab.gaussian/1", "weightlab.tsd/1",
         "weightlab.merge/1"]


BUILDERS: dict[str, Callable[[dict, Path], Section]] = {
    "weightlab.spectrum/1": _spectrum, "weightlab.angles/1": _angles, "weightlab.gaussian/1": _gaussian,
    "weightlab.tsd/1": _tsd, "weightlab.merge/1": _merge, "weightlab.demo/1": _demo,
}


def sections_for(payloads: list[dict], plots: Path) -> list[Section]:
    out = []
    for payload in sorted(payloads, key=lambda p: ORDER.index(p["schema"]) if p.get("schema") in ORDER else len(ORDER)):
        schema = payload.get("schema", "")
        builder = BUILDERS.get(schema)
        if builder is None:
            raise InvalidArgument(f"no report section for schema {schema!r}; known: {', '.join(BUILDERS)}")
        try:
            out.append(builder(payload, plots))
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:  # hand-edited or truncated JSON
            detail = f"missing field {e}" if isinstance(e, KeyError) else str(e).splitlines()[0][:120]
            raise InvalidArgument(f"result does not match {schema} ({detail})") from e
    return out


def result_files(paths: list[Path]) -> list[Path]:
    """The JSON files named, and every `*.json` inside the folders named."""
    files = []
    for path in map(Path, paths):
        if not path.exists():
            raise CheckpointNotFound("no such file or folder", path)
        files.extend(sorted(path.rglob("*.json")) if path.is_dir() else [path])
    return files


def load_results(paths: list[Path]) -> list[dict]:
    """JSON results by file, or every known result in a folder (e.g. the demo's output): in a
    folder, JSON files that are no weightlab result are passed over; named, they are an error."""
    payloads = []
    for path in map(Path, paths):
        named = not path.is_dir()
        for file in result_files([path]):
            try:
                data = json.loads(file.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, OSError) as e:
                if named:
                    raise InvalidArgument(f"not a JSON result ({e.__class__.__name__})", file) from None
                continue
            if isinstance(data, dict) and data.get("schema") in BUILDERS:
                payloads.append(data)
            elif named:
                raise InvalidArgument("not a weightlab result (no known 'schema')", file)
    if not payloads:
        raise InvalidArgument("no weightlab results found in " + ", ".join(map(str, paths)))
    return payloads


# ---- rendering ------------------------------------------------------------------------------

CSS = """
body{font:15px/1.5 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
header{background:#1d2330;color:#fff;padding:22px 36px}header h1{margin:0;font-size:24px}
header p{margin:4px 0 0;color:#b8c0cc}main{max-width:1200px;margin:0 auto;padding:18px 36px 48px}
section{background:#fff;border:1px solid #e3e6eb;border-radius:10px;padding:18px 22px;margin:18px 0}
h2{margin:0 0 4px;font-size:19px}.ref{color:#6b7380;font-size:13px;margin-bottom:12px}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:10px 0 14px}.card{background:#f1f4f9;border-radius:8px;padding:8px 14px;min-width:150px}
.card .v{font-size:20px;font-weight:600;word-break:break-all}.card .k{font-size:12px;color:#5b6472}
img{max-width:100%;border:1px solid #eef0f3;border-radius:6px;margin:8px 0}
table{border-collapse:collapse;width:100%;font-size:13px;margin-top:10px}th,td{padding:4px 8px;border-bottom:1px solid #edf0f3;text-align:right}
th:first-child,td:first-child{text-align:left}th{cursor:pointer;background:#fafbfc;position:sticky;top:0;user-select:none}
th:hover{background:#eef2f8}.note{color:#5b6472;font-size:13px}h3{font-size:15px;margin:14px 0 0}h3 a{color:#1d2330;text-decoration:none}
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


def _value(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else fmt(v, 4)
    return fmt(v)


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def render_html(title: str, sections: list[Section], max_rows: int = 500) -> str:
    e = html.escape
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{e(title)}</title>",
             "<meta name='viewport' content='width=device-width, initial-scale=1'>",
             f"<style>{CSS}</style></head><body><header><h1>{e(title)}</h1>",
             "<p>weightlab report: what changed, and where</p></header><main>"]
    parts.append("<section class='summary'><h2>Summary</h2>")
    for i, s in enumerate(sections):
        parts.append(f"<h3><a href='#s{i}'>{e(s.title)}</a></h3><div class='cards'>")
        for key, label, value in s.headline:
            parts.append(f"<div class='card'><div class='v' data-key='{e(key)}' data-v='{e(str(value))}'>"
                         f"{e(_value(value))}</div><div class='k'>{e(label)}</div></div>")
        parts.append("</div>")
    parts.append("</section>")
    for i, s in enumerate(sections):
        parts.append(f"<section id='s{i}'><h2>{e(s.title)}</h2><div class='ref'>{e(s.reference)}</div>")
        for image in s.images:
            parts.append(f"<img alt='{e(image.stem.replace('_', ' '))}' src='{_data_uri(image)}'>")
        if s.note:
            parts.append(f"<p class='note'>{e(s.note)}</p>")
        if s.rows:
            shown = s.rows[:max_rows]
            parts.append("<div class='scroll'><table><thead><tr>" + "".join(f"<th>{e(c)}</th>" for c in s.columns)
                         + "</tr></thead><tbody>")
            for row in shown:
                parts.append("<tr>" + "".join(f"<td data-v='{e(str(v))}'>{e(_value(v))}</td>" for v in row) + "</tr>")
            parts.append("</tbody></table></div>")
            if len(s.rows) > max_rows:
                parts.append(f"<p class='note'>{len(s.rows) - max_rows} more rows in the JSON result.</p>")
    parts.append(f"</main><script>{SCRIPT}</script></body></html>")
    return "".join(parts)


def render_markdown(title: str, sections: list[Section], assets: str, max_rows: int = 30) -> str:
    lines = [f"# {title}", "", "| analysis | quantity | value |", "|---|---|---|"]
    for s in sections:
        lines += [f"| {s.title} | {label} | {_value(value)} |" for _, label, value in s.headline]
    for s in sections:
        lines += ["", f"## {s.title}", "", f"_{s.reference}_", ""]
        lines += [f"![{image.stem}]({assets}/{image.parent.name}_{image.name})" for image in s.images]
        if s.note:
            lines += ["", s.note]
        if s.rows:
            lines += ["", "| " + " | ".join(s.columns) + " |", "|" + "---|" * len(s.columns)]
            lines += ["| " + " | ".join(_value(short_name(v, 60) if isinstance(v, str) else v) for v in row) + " |"
                      for row in s.rows[:max_rows]]
    return "\n".join(lines) + "\n"


def assets_folder(markdown: str | Path) -> Path:
    """Where the Markdown report's PNGs go: `<name>_assets/` beside it."""
    md = Path(markdown)
    return md.with_name(md.stem + "_assets")


def write_report(payloads: list[dict], out: str | Path, *, title: str = "weightlab report",
                 markdown: str | Path | None = None, assets: str | Path | None = None,
                 force: bool = False) -> list[Section]:
    """Build the sections (drawing the plots again from the results) and write the HTML file, and
    with `markdown` a Markdown file plus its PNGs in `assets` (default `<name>_assets/` beside it)."""
    with tempfile.TemporaryDirectory(prefix="weightlab-report-") as tmp:
        sections = sections_for(payloads, Path(tmp))
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
