"""`weightlab gaussian` and `weightlab tsd`: weight distributions and task-specific directions."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from weightlab.analysis.gaussian import GaussianOptions, gaussian as compute_gaussian
from weightlab.analysis.tsd import TSDOptions, save_directions, tsd as compute_tsd
from weightlab.cli.app import (CsvOpt, DeviceOpt, DtypeOpt, ExcludeOpt, ForceOpt, IncludeOpt, JsonOpt, PlotsOpt,
                               ReportOpt, app, check_outputs, console, progress, quiet_when_stdout, show_problems,
                               write_html_report, write_plots)
from weightlab.compute.device import Compute
from weightlab.io.adapter import open_finetuned, open_weights
from weightlab.report.export import write_outputs
from weightlab.report.plots import gaussian_plots, tsd_plots
from weightlab.report.tables import short_name, table


@app.command()
def gaussian(
    checkpoint: Path = typer.Argument(..., help="Checkpoint to test (with --base: a fine-tune or adapter of BASE)."),
    base: Optional[Path] = typer.Option(None, "--base", help="Also test ΔW = CHECKPOINT − BASE and its trend with depth."),
    min_elements: int = typer.Option(4096, "--min-elements", help="Skip tensors with fewer entries."),
    sample_size: int = typer.Option(100_000, "--sample-size", help="Entries sampled (seeded) for KS, AD, K² and Q-Q."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sample."),
    include: Optional[str] = IncludeOpt,
    exclude: Optional[str] = ExcludeOpt,
    rows: int = typer.Option(25, "--rows", help="Tensors shown in the terminal table (least Gaussian first)."),
    device: str = DeviceOpt,
    json_out: Optional[str] = JsonOpt,
    csv_out: Optional[str] = CsvOpt,
    plots: Optional[Path] = PlotsOpt,
    report: Optional[Path] = ReportOpt,
    force: bool = ForceOpt,
) -> None:
    """Moments, normality tests and a shape label per tensor; with --base, the same for ΔW and its spread vs depth.

    Example: weightlab gaussian ft/ --base base/ --plots plots/
    """
    check_outputs(force, json_out, csv_out, plots, report)
    compute = Compute.create(device, "float32")  # storage precision; moments accumulate in float64
    options = GaussianOptions(min_elements, sample_size, seed, include, exclude)
    base_ckpt = open_weights(base) if base else None
    ckpt = open_finetuned(checkpoint, base_ckpt) if base_ckpt else open_weights(checkpoint)
    with progress("gaussian", "tensors") as (on_start, on_progress):
        result = compute_gaussian(ckpt, base_ckpt, options, compute, on_progress, on_start)
    write_outputs(result.to_dict(), [t.row() for t in result.tensors], json_out, csv_out, force)
    write_plots(plots, force, lambda d: gaussian_plots(result, ckpt, base_ckpt, d, sample_size))
    write_html_report(result.to_dict(), report, force)
    if quiet_when_stdout(json_out, csv_out):
        return
    show_problems(result.problems)
    part = "delta" if base_ckpt else "weights"
    shown = sorted(result.tensors, key=lambda t: getattr(t, part).qq_r2)[:rows]
    body = []
    for t in shown:
        d = getattr(t, part)
        body.append((short_name(t.name, 44, drop_layer=True), t.layer, t.role, d.label, d.std, d.skewness,
                     d.excess_kurtosis, d.beyond_3sigma, d.near_zero, d.ks_statistic, d.anderson_darling, d.qq_r2,
                     *([t.std_ratio, t.delta_weight_correlation] if base_ckpt else [])))
    columns = ["tensor", "layer", "role", "label", "std", "skew", "ex.kurt", ">3σ", "≈0", "KS", "AD", "Q-Q R²",
               *(["std W'/W", "corr(ΔW,W)"] if base_ckpt else [])]
    what = "ΔW" if base_ckpt else "weights"
    console.print(table(f"Gaussianity of {what}: {len(result.tensors)} tensors, least Gaussian first", columns, body,
                        caption="≈0: fraction |x| < 0.01σ; >3σ: Gaussian 0.0027"))
    counts = result.label_counts()
    console.print("weights: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if base_ckpt:
        console.print("ΔW:      " + ", ".join(f"{k} {v}" for k, v in result.label_counts("delta").items()))
    if result.depth_trend is not None:
        t = result.depth_trend
        verdict = "grows" if t.grows_with_depth else ("shrinks" if t.slope < 0 and t.pvalue < 0.05 else "no clear trend")
        console.print(f"std(ΔW) vs depth: slope {t.slope:+.3e} per layer (R² {t.r2:.2f}, p {t.pvalue:.2g}): {verdict}")


@app.command()
def tsd(
    base: Path = typer.Argument(..., help="Base checkpoint."),
    finetuned: Path = typer.Argument(..., help="Fine-tuned checkpoint or PEFT adapter (e.g. a short warm-up run)."),
    top: int = typer.Option(8, "--top", help="Task-specific directions kept per matrix."),
    keep: Optional[int] = typer.Option(None, "--keep", help="Change rates kept per matrix in --json (default all)."),
    save: Optional[Path] = typer.Option(None, "--save", help="Store indices, u, v, σ, δ per matrix (.safetensors) for init-lora.",
                                        metavar="FILE"),
    include: Optional[str] = IncludeOpt,
    exclude: Optional[str] = ExcludeOpt,
    rows: int = typer.Option(25, "--rows", help="Matrices shown in the terminal table."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    json_out: Optional[str] = JsonOpt,
    csv_out: Optional[str] = CsvOpt,
    plots: Optional[Path] = PlotsOpt,
    report: Optional[Path] = ReportOpt,
    force: bool = ForceOpt,
) -> None:
    """Task-specific directions: base singular directions with the largest change rate |u_iᵀΔWv_i|/σ_i.

    Example: weightlab tsd base/ warmup-adapter/ --top 8 --save tsd.safetensors
    """
    check_outputs(force, json_out, csv_out, plots, report, save)
    compute = Compute.create(device, dtype)
    base_ckpt = open_weights(base)
    ft = open_finetuned(finetuned, base_ckpt)
    with progress("tsd") as (on_start, on_progress):
        result, vectors = compute_tsd(base_ckpt, ft, TSDOptions(top, keep, include, exclude), compute, on_progress,
                                      on_start, keep_vectors=save is not None)
    rows_out = [{"name": m.name, "layer": m.layer, "role": m.role, "indices": m.indices, "rates": m.rate,
                 "core_energy_share": m.core_energy_share, "tsd_energy_share": m.tsd_energy_share,
                 "delta_norm": m.delta_norm} for m in result.matrices]
    write_outputs(result.to_dict(), rows_out, json_out, csv_out, force)
    if save:
        save_directions(save, vectors, {"base": str(base), "finetuned": str(finetuned), "top": str(top)}, force)
    write_plots(plots, force, lambda d: tsd_plots(result, d))
    write_html_report(result.to_dict(), report, force)
    if quiet_when_stdout(json_out, csv_out):
        return
    show_problems(result.problems)
    shown = sorted(result.matrices, key=lambda m: -m.delta_norm)[:rows]
    body = [(short_name(m.name, 44, drop_layer=True), m.layer, m.role, ", ".join(map(str, m.indices[:8])),
             ", ".join(f"{r:.2g}" for r in m.rate[:3]), sum(m.percentile) / len(m.percentile), m.tsd_energy_share,
             m.core_energy_share) for m in shown]
    console.print(table(f"task-specific directions (top {top}), largest updates first",
                        ["matrix", "layer", "role", "TSD indices", "top δ", "mean pct", "TSD share", "core share"], body,
                        caption="pct: position in the spectrum (0 = largest σ); shares of ‖ΔW‖²_F on the TSDs / all core directions"))
    hist = result.percentile_histogram()
    console.print("TSD positions by spectrum decile (top σ first): " + " ".join(str(c) for c in hist))
