"""`weightlab gaussian`: how Gaussian the weights, and the fine-tuning update, are."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from weightlab.analysis.gaussian import GaussianOptions, gaussian as compute_gaussian
from weightlab.cli.app import (CsvOpt, DeviceOpt, ExcludeOpt, ForceOpt, IncludeOpt, JsonOpt, PlotsOpt, ReportOpt,
                               app, check_rows, console, emit, outputs, progress, quiet_when_stdout, show_problems)
from weightlab.compute.device import Compute
from weightlab.io import open_finetuned, open_weights
from weightlab.report.plots import gaussian_plots
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
    options = GaussianOptions(min_elements, sample_size, seed, include=include, exclude=exclude)
    compute = Compute.create(device, "float32")  # storage precision; moments accumulate in float64
    check_rows(rows)
    with outputs(force, [checkpoint, base], json=json_out, csv=csv_out, plots=plots, report=report) as plan:
        base_ckpt = open_weights(base) if base else None
        ckpt = open_finetuned(checkpoint, base_ckpt) if base_ckpt else open_weights(checkpoint)
        with progress("gaussian", "tensors") as (on_start, on_progress):
            result = compute_gaussian(ckpt, base_ckpt, options, compute, on_progress, on_start)
        emit(plan, result.to_dict(), [t.row() for t in result.tensors],
             lambda d: gaussian_plots(result, ckpt, base_ckpt, d, sample_size))
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
