"""`weightlab spectrum` and `weightlab angles`: the SVD analyses of what fine-tuning changed."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from weightlab.analysis.angles import AnglesOptions, angles as compute_angles, summarise_angles
from weightlab.analysis.spectrum import SpectrumOptions, spectrum as compute_spectrum, summarise
from weightlab.cli.app import (CsvOpt, DeviceOpt, DtypeOpt, ExcludeOpt, ForceOpt, IncludeOpt, JsonOpt, PlotsOpt,
                               ReportOpt, app, check_outputs, console, progress, quiet_when_stdout, show_problems,
                               write_html_report, write_plots)
from weightlab.compute.device import Compute
from weightlab.io.adapter import open_finetuned, open_weights
from weightlab.report.export import write_outputs
from weightlab.report.plots import angles_plots, spectrum_plots
from weightlab.report.tables import short_name, table


@app.command()
def spectrum(
    base: Path = typer.Argument(..., help="Base checkpoint (file or folder)."),
    finetuned: List[Path] = typer.Argument(..., help="Fine-tuned checkpoints or PEFT adapters of BASE."),
    k: int = typer.Option(8, "-k", "--top-k", help="Top singular values/vectors for amplification and reorientation."),
    intruder_k: int = typer.Option(10, "--intruder-k", help="Top fine-tuned singular vectors checked for intruders."),
    epsilon: float = typer.Option(0.5, "--epsilon", help="Intruder threshold on max |cos| with any base singular vector."),
    keep: Optional[int] = typer.Option(None, "--keep", help="Singular values kept per matrix in --json (default all)."),
    include: Optional[str] = IncludeOpt,
    exclude: Optional[str] = ExcludeOpt,
    rows: int = typer.Option(25, "--rows", help="Matrices shown in the terminal table (all go to --json/--csv)."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    json_out: Optional[str] = JsonOpt,
    csv_out: Optional[str] = CsvOpt,
    plots: Optional[Path] = PlotsOpt,
    report: Optional[Path] = ReportOpt,
    force: bool = ForceOpt,
) -> None:
    """Per-matrix SVD of base vs fine-tuned: amplification, norms and ranks, reorientation, intruders.

    Example: weightlab spectrum base/ ft/ --plots plots/ --json spectrum.json
    """
    check_outputs(force, json_out, csv_out, plots, report)
    compute = Compute.create(device, dtype)
    options = SpectrumOptions(k, intruder_k, epsilon, keep, include, exclude)
    base_ckpt = open_weights(base)
    fts = [open_finetuned(p, base_ckpt) for p in finetuned]
    with progress("spectrum") as (on_start, on_progress):
        result = compute_spectrum(base_ckpt, fts, options, compute, on_progress, on_start)
    write_outputs(result.to_dict(), [m.row() for m in result.matrices], json_out, csv_out, force)
    write_plots(plots, force, lambda d: spectrum_plots(result, d))
    write_html_report(result.to_dict(), report, force)
    if quiet_when_stdout(json_out, csv_out):
        return
    show_problems(result.problems)
    several = len(fts) > 1
    shown = sorted(result.matrices, key=lambda m: -m.relative_change)[:rows]
    columns = ["matrix", *(["ft"] if several else []), "layer", "role", "shape", "‖ΔW‖/‖W‖", "σ'₁/σ₁",
               f"top{k} share", "rank90 ΔW", "eff.rank", "|u'₁·u₁|", "φ", "intr."]
    body = [(short_name(m.name, 44, drop_layer=True), *([m.finetuned] if several else []), m.layer, m.role,
             f"{m.shape[0]}×{m.shape[1]}", m.relative_change, m.amplification[0], m.topk_change_share,
             m.delta_rank90, f"{m.base.effective_rank:.0f}→{m.ft.effective_rank:.0f}", m.u_alignment[0],
             m.subspace_similarity, len(m.intruders)) for m in shown]
    console.print(table(f"spectrum: {len(result.matrices)} matrices, most changed first", columns, body,
                        numeric_from=2 if several else 1,
                        caption=f"φ = ‖U_kᵀU'_k‖²/k, k = {k}; eff.rank = exp(entropy of σ) for W→W'; intr. = intruder dimensions"))
    for by in ("layer", "role"):
        summary = summarise(result.matrices, by)
        console.print(table(f"by {by}", [*(["ft"] if several else []), by, "matrices", "‖ΔW‖/‖W‖",
                                         "σ'/σ (top k)", "|u'·u| (top k)", "φ", "intruders"],
                            [(*([s["finetuned"]] if several else []), s[by], s["matrices"], s["relative_change"],
                              s["mean_amplification_k"], s["mean_u_alignment_k"], s["subspace_similarity"],
                              s["intruders"]) for s in summary], numeric_from=2 if several else 1))


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
    check_outputs(force, json_out, csv_out, plots, report)
    compute = Compute.create(device, dtype)
    options = AnglesOptions(k, side, svd, seed, include, exclude)
    base_ckpt = open_weights(base) if base else None
    ckpt_a, ckpt_b = ((open_finetuned(p, base_ckpt) for p in (a, b)) if base_ckpt else (open_weights(p) for p in (a, b)))
    with progress("angles") as (on_start, on_progress):
        result = compute_angles(ckpt_a, ckpt_b, base_ckpt, options, compute, on_progress, on_start)
    write_outputs(result.to_dict(), [m.row() for m in result.matrices], json_out, csv_out, force)
    write_plots(plots, force, lambda d: angles_plots(result, d))
    write_html_report(result.to_dict(), report, force)
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
