"""`weightlab mitigate-intruders`: scale a fine-tune's intruder dimensions by λ."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import typer

from weightlab.cli.app import Operation, PlotsOpt, operation_command, progress
from weightlab.options import IntruderOptions


@operation_command("mitigate-intruders")
def mitigate(
    base: Path = typer.Argument(..., help="Base checkpoint (file, folder or Hub ID)."),
    finetuned: Path = typer.Argument(..., help="Fine-tuned checkpoint, or a PEFT adapter of BASE."),
    options: IntruderOptions = None,
    plots: Path | None = PlotsOpt,
    common: Operation = None,
) -> None:
    """Scale the intruder dimensions of a fine-tune by λ (Shuttleworth et al. 2024), to undo forgetting.

    Example: weightlab mitigate-intruders base/ ft/ -o ft-mitigated/ --lambda 0.75

    A checkpoint gives a checkpoint in which only matrices with intruders differ; an adapter gives
    an adapter (exact: its rank grows by the number of intruders of each module).
    """
    with common.outputs([base, finetuned], plots=plots) as plan:
        from weightlab.io import open_finetuned, open_weights
        from weightlab.io.adapter import AdaptedCheckpoint
        from weightlab.io.writer import CheckpointWriter, stored_plan
        from weightlab.surgery.intruders import mitigate_intruders

        compute = common.compute()
        base_ckpt = open_weights(base)
        ft = open_finetuned(finetuned, base_ckpt)
        writer = (
            None
            if isinstance(ft, AdaptedCheckpoint)
            else CheckpointWriter(
                plan.path("-o"),
                donor=ft.path,
                plan=stored_plan(ft),
                metadata={"weightlab": f"intruders scaled by {options.scale:g}"},
            )
        )
        with progress("mitigate-intruders") as (on_start, on_progress), writer or nullcontext():
            result, adapter = mitigate_intruders(
                base_ckpt, ft, str(common.out), options, writer, compute, on_progress, on_start
            )
        common.finish(plan, result, adapter)
    common.show(result)
