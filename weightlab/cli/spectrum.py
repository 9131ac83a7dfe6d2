"""`weightlab spectrum`: how fine-tuning moved each weight matrix's singular values and vectors."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from weightlab.analysis.spectrum import SpectrumOptions, spectrum as compute_spectrum, summarise
from weightlab.cli.app import (CsvOpt, DeviceOpt, DtypeOpt, ExcludeOpt, ForceOpt, IncludeOpt, JsonOpt, PlotsOpt,
                               ReportOpt, app, check_rows, console, emit, outputs, progress, quiet_when_stdout,
                               show_problems)
from weightlab.compute.device import Compute
from weightlab.io import open_finetuned, open_weights
from weightlab.report.plots import spectrum_plots
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
    options = SpectrumOptions(k, intruder_k, epsilon, keep, include=include, exclude=exclude)
    compute = Compute.create(device, dtype)
    check_rows(rows)
    with outputs(force, [base, *finetuned], json=json_out, csv=csv_out, plots=plots, report=report) as plan:
        base_ckpt = open_weights(base)
        fts = [open_finetuned(p, base_ckpt) for p in finetuned]
        with progress("spectrum") as (on_start, on_progress):
            result = compute_spectrum(base_ckpt, fts, options, compute, on_progress, on_start)
        emit(plan, result.to_dict(), [m.row() for m in result.matrices], lambda d: spectrum_plots(result, d))
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
