"""`weightlab compare`: which fine-tunes of one base agree, and which would fight when merged."""

from __future__ import annotations

from pathlib import Path

import typer

from weightlab.cli.app import Common, analysis_command
from weightlab.options import CompareOptions


@analysis_command()
def compare(
    finetuned: list[Path] = typer.Argument(..., help="Two or more fine-tuned checkpoints or PEFT adapters of BASE."),
    base: Path = typer.Option(..., "--base", help="The base checkpoint every fine-tune started from."),
    options: CompareOptions = None,
    common: Common = None,
) -> None:
    """Pairwise task-vector cosine, subspace overlap, TIES sign conflict and norm ratios of a bank of fine-tunes.

    Example: weightlab compare --base base/ ft_a/ ft_b/ adapter/ --plots plots/ --json compare.json
    """
    from weightlab.api.analyses import compare as run_compare

    common.show(run_compare.core(finetuned, base, options=options, run=common.run()))
