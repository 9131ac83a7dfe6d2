"""`weightlab angles`: principal angles between the top singular subspaces of two checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from weightlab.analysis.angles import AnglesOptions, angles as compute_angles, summarise_angles
from weightlab.cli.app import (CsvOpt, DeviceOpt, DtypeOpt, ExcludeOpt, ForceOpt, IncludeOpt, JsonOpt, PlotsOpt,
                               ReportOpt, app, check_rows, console, emit, outputs, progress, quiet_when_stdout,
                               show_problems)
from weightlab.compute.device import Compute
from weightlab.io import open_finetuned, open_weights
from weightlab.report.plots import angles_plots
from weightlab.report.tables import short_name, table


@app.command()
def angles(
    a: Path = typer.Argument(..., help="First checkpoint (or adapter, with --base)."),
    b: Path = typer.Argument(..., help="Second checkpoint (or adapter, with --base)."),
    base: Optional[Path] = typer.Option(None, "--base", help="Compare task vectors A−BASE and B−BASE instead of weights."),
    k: int = typer.Option(16, "-k", "--top-k", help="Dimension of the top singular subspaces."),
    side: str = typer.Option("left", "--side", help="left (column space), right (row space) or both."),
    svd: str = typer.Option("exact", "--svd", help="exact, or randomized (seeded) for k ≪ min(m, n)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the randomized SVD."),
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
    """Principal angles between top-k singular subspaces of matching matrices of A and B.

    Example: weightlab angles ft_math/ ft_code/ --base base/ -k 16 --plots plots/
    """
    options = AnglesOptions(k, side, svd, seed, include=include, exclude=exclude)
    compute = Compute.create(device, dtype)
    check_rows(rows)
    with outputs(force, [a, b, base], json=json_out, csv=csv_out, plots=plots, report=report) as plan:
        base_ckpt = open_weights(base) if base else None
        ckpt_a, ckpt_b = (open_finetuned(p, base_ckpt) if base_ckpt else open_weights(p) for p in (a, b))
        with progress("angles") as (on_start, on_progress):
            result = compute_angles(ckpt_a, ckpt_b, base_ckpt, options, compute, on_progress, on_start)
        emit(plan, result.to_dict(), [m.row() for m in result.matrices], lambda d: angles_plots(result, d))
    if quiet_when_stdout(json_out, csv_out):
        return
    show_problems(result.problems)
    what = "task vectors" if base else "weights"
    shown = sorted(result.matrices, key=lambda m: m.mean_angle)[:rows]
    body = [(short_name(m.name, 44, drop_layer=True), m.layer, m.role, m.side, m.k, m.mean_angle,
             m.angles_deg[0] if m.angles_deg else None, m.angles_deg[-1] if m.angles_deg else None, m.overlap)
            for m in shown]
    console.print(table(f"principal angles of {what}, top-{k} subspaces (most aligned first)",
                        ["matrix", "layer", "role", "side", "k", "mean °", "min °", "max °", "mean cos²"], body))
    for by in ("layer", "role"):
        summary = summarise_angles(result.matrices, by)
        console.print(table(f"by {by}", ["side", by, "matrices", "mean °", "mean cos²"],
                            [(s["side"], s[by], s["matrices"], s["mean_angle_deg"], s["overlap"]) for s in summary],
                            numeric_from=2))
