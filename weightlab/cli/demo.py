"""`weightlab demo`: the built-in tour on a real pretrained model."""

from __future__ import annotations

from pathlib import Path

import typer

from weightlab.cli.app import DeviceOpt, ForceOpt, app, console, err_console
from weightlab.cli.progress import stages
from weightlab.examples import minilm_path
from weightlab.io.outputs import plan_outputs
from weightlab.report.tables import table


@app.command()
def demo(
    out: Path = typer.Option(Path("weightlab-demo"), "--out", help="Folder for everything the tour writes."),
    device: str = DeviceOpt,
    force: bool = ForceOpt,
) -> None:
    """Fine-tune all-MiniLM-L6-v2 briefly (offline, cached) and run the analyses on it; results under --out.

    Example: weightlab demo --out ./weightlab-demo
    """
    from weightlab.compute.device import Compute
    from weightlab.demo import DEMO_STAGES, DemoSummary, cache_dir, run_demo

    compute = Compute.create(device)
    with (
        plan_outputs(force, [minilm_path(), cache_dir()], out_dir=out) as plan,
        stages(err_console, "demo", DEMO_STAGES) as step,
    ):
        folder = plan.path("-o")
        folder.mkdir()
        summary = run_demo(folder, compute, on_step=step)
    rows = [
        (
            key,
            f"{ft['accuracy']['before']:.2f} → {ft['accuracy']['after']:.2f}",
            "LoRA r=8" if ft["lora"] else "full",
            summary["spectrum"][key]["mean_relative_change"],
            summary["spectrum"][key]["most_changed_role"],
            summary["spectrum"][key]["intruders"],
        )
        for key, ft in summary["fine_tunes"].items()
    ]
    console.print(
        table(
            "what fine-tuning did to all-MiniLM-L6-v2",
            ["fine-tune", "test accuracy", "kind", "mean ‖ΔW‖/‖W‖", "most changed role", "intruders"],
            rows,
        )
    )
    console.print(
        f"task vectors of the two full fine-tunes: mean principal angle "
        f"{summary['angles_ft_animal_vs_ft_colour_mean_deg']:.1f}° (90° = unrelated directions)"
    )
    ranked = DemoSummary.from_dict(summary)
    for t in ranked.tables():
        console.print(table(t.title, t.columns, t.rows))
    for line in ranked.lines():
        console.print(line)
    g = summary["gaussian"]
    console.print(
        f"ΔW shapes: {', '.join(f'{k} {v}' for k, v in g['delta'].items() if v)}; "
        f"std(ΔW) slope per layer {g['delta_std_slope_per_layer']:+.2e}"
    )
    console.print(
        f"extract-lora (90% energy): {summary['extract_lora']['modules']} modules, mean rank "
        f"{summary['extract_lora']['mean_rank']:.1f}, animal accuracy {summary['extract_lora']['accuracy_animal']:.2f}"
    )
    esd, intruders = summary["esd"], summary["intruders"]
    console.print(
        f"esd: mean power-law α {esd['mean_alpha_weights']:.2f} for W, {esd['mean_alpha_delta']:.2f} for ΔW; "
        f"mitigate-intruders: {intruders['intruders']} intruders in {intruders['with_intruders']} of "
        f"{intruders['matrices']} matrices scaled by 0.75, animal accuracy {intruders['accuracy_animal_before']:.2f}"
        f" → {intruders['accuracy_animal_after']:.2f}"
    )
    console.print(f"base model: {summary['model']}")
    console.print(
        "fine-tunes (trained once, kept for the next tour): "
        + ", ".join(f"{key} in {ft['path']}" for key, ft in summary["fine_tunes"].items()),
        soft_wrap=True,
    )
    console.print(
        f"[bold]report: {out}/report.html[/] (and report.md); results in {out}/: summary.json, one JSON per "
        "analysis, merged/, lora-init/, lora-extract/, plots/"
    )
