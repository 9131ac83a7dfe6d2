"""`weightlab mitigate-intruders`: scale a fine-tune's intruder dimensions by λ."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import typer

from weightlab.cli.app import (
    DeviceOpt,
    ForceOpt,
    JsonOpt,
    PlotsOpt,
    ReportOpt,
    ThreadsOpt,
    command,
    emit,
    outputs,
    progress,
    show,
)
from weightlab.options import IntruderOptions


@command(name="mitigate-intruders")
def mitigate(
    base: Path = typer.Argument(..., help="Base checkpoint (file, folder or Hub ID)."),
    finetuned: Path = typer.Argument(..., help="Fine-tuned checkpoint, or a PEFT adapter of BASE."),
    out: Path = typer.Option(..., "-o", "--out", help="Where to write the mitigated checkpoint (or adapter)."),
    options: IntruderOptions = None,
    json_out: str | None = JsonOpt,
    plots: Path | None = PlotsOpt,
    report: Path | None = ReportOpt,
    device: str = DeviceOpt,
    threads: int | None = ThreadsOpt,
    force: bool = ForceOpt,
) -> None:
    """Scale the intruder dimensions of a fine-tune by λ (Shuttleworth et al. 2024), to undo forgetting.

    Example: weightlab mitigate-intruders base/ ft/ -o ft-mitigated/ --lambda 0.75

    A checkpoint gives a checkpoint in which only matrices with intruders differ; an adapter gives
    an adapter (exact: its rank grows by the number of intruders of each module).
    """
    with outputs(force, [base, finetuned], out_dir=out, json=json_out, plots=plots, report=report) as plan:
        from weightlab.compute.device import Compute
        from weightlab.io import open_finetuned, open_weights
        from weightlab.io.adapter import AdaptedCheckpoint
        from weightlab.io.adapter_writer import write_adapter
        from weightlab.io.writer import CheckpointWriter, stored_plan
        from weightlab.surgery.intruders import mitigate_intruders

        compute = Compute.create(device, threads=threads)
        base_ckpt = open_weights(base)
        ft = open_finetuned(finetuned, base_ckpt)
        adapter = isinstance(ft, AdaptedCheckpoint)
        writer = (
            None
            if adapter
            else CheckpointWriter(
                plan.path("-o"),
                donor=ft.path,
                plan=stored_plan(ft),
                metadata={"weightlab": f"intruders scaled by {options.scale:g}"},
            )
        )
        with progress("mitigate-intruders") as (on_start, on_progress), writer or nullcontext():
            result, mitigated = mitigate_intruders(
                base_ckpt, ft, str(out), options, writer, compute, on_progress, on_start
            )
        if mitigated is not None:
            write_adapter(
                plan.path("-o"),
                mitigated.factors,
                scale=1.0,
                base_model=ft.adapter.base_model_name_or_path,
                fan_in_fan_out=bool(ft.adapter.adapter_config.get("fan_in_fan_out")),
                sidecar=result.to_dict(),
                saved=mitigated.saved,
            )
        emit(plan, result)
    if json_out != "-":
        show(result)
