"""`weightlab mitigate-intruders`: scale a fine-tune's intruder dimensions by λ."""

from __future__ import annotations

from pathlib import Path

import typer

from weightlab.cli.app import Operation, PlotsOpt, operation_command
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
    from weightlab.api.operations import mitigate_intruders

    result = mitigate_intruders.core(base, finetuned, out=common.out, options=options, run=common.run(plots))
    common.show(result)
