"""`weightlab compare`: which fine-tunes of one base agree, and which would fight when merged."""

from __future__ import annotations

from pathlib import Path

import typer

from weightlab.cli.app import Common, analysis_command, emit, progress
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
    with common.outputs([base, *finetuned]) as plan:
        from weightlab.analysis.compare import compare as compute_compare
        from weightlab.io import open_finetuned, open_weights

        compute = common.compute()
        base_ckpt = open_weights(base)
        fts = [open_finetuned(p, base_ckpt) for p in finetuned]
        with progress("compare", "tensors") as (on_start, on_progress):
            result = compute_compare(base_ckpt, fts, options, compute, on_progress, on_start)
        emit(plan, result)
    common.show(result)
