"""`weightlab tsd`: task-specific directions, the base singular directions a fine-tune moved most."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from weightlab.analysis.tsd import TSDOptions, save_directions, tsd as compute_tsd
from weightlab.cli.app import (CsvOpt, DeviceOpt, DtypeOpt, ExcludeOpt, ForceOpt, IncludeOpt, JsonOpt, PlotsOpt,
                               ReportOpt, app, check_rows, console, emit, outputs, progress, quiet_when_stdout,
                               show_problems)
from weightlab.compute.device import Compute
from weightlab.io import open_finetuned, open_weights
from weightlab.report.plots import tsd_plots
from weightlab.report.tables import short_name, table


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
    options = TSDOptions(top, keep, include=include, exclude=exclude)
    compute = Compute.create(device, dtype)
    check_rows(rows)
    with outputs(force, [base, finetuned], json=json_out, csv=csv_out, plots=plots, report=report, save=save) as plan:
        base_ckpt = open_weights(base)
        ft = open_finetuned(finetuned, base_ckpt)
        with progress("tsd") as (on_start, on_progress):
            result, vectors = compute_tsd(base_ckpt, ft, options, compute, on_progress, on_start,
                                          keep_vectors=save is not None)
        rows_out = [{"name": m.name, "layer": m.layer, "role": m.role, "indices": m.indices, "rates": m.rate,
                     "core_energy_share": m.core_energy_share, "tsd_energy_share": m.tsd_energy_share,
                     "delta_norm": m.delta_norm} for m in result.matrices]
        if save:
            save_directions(plan.path("--save"), vectors, {"base": str(base), "finetuned": str(finetuned), "top": str(top)})
        emit(plan, result.to_dict(), rows_out, lambda d: tsd_plots(result, d))
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
