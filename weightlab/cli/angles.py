"""`weightlab angles`: principal angles between the top singular subspaces of two checkpoints."""

from __future__ import annotations

from pathlib import Path

import typer

from weightlab.cli.app import Common, analysis_command, emit, progress, refuse_unless
from weightlab.options import AnglesOptions


@analysis_command()
def angles(
    a: Path = typer.Argument(..., help="First checkpoint (or adapter, with --base)."),
    b: Path = typer.Argument(..., help="Second checkpoint (or adapter, with --base)."),
    base: Path | None = typer.Option(None, "--base", help="Compare task vectors A−BASE and B−BASE instead of weights."),
    options: AnglesOptions = None,
    common: Common = None,
) -> None:
    """Principal angles between top-k singular subspaces of matching matrices of A and B.

    Example: weightlab angles ft_math/ ft_code/ --base base/ -k 16 --plots plots/
    """
    refuse_unless(options.svd == "randomized", "seeds only --svd randomized (the exact SVD has no randomness)", "seed")
    with common.outputs([a, b, base]) as plan:
        from weightlab.analysis.angles import angles as compute_angles
        from weightlab.io import open_finetuned, open_weights

        compute = common.compute()
        base_ckpt = open_weights(base) if base else None
        ckpt_a, ckpt_b = (open_finetuned(p, base_ckpt) if base_ckpt else open_weights(p) for p in (a, b))
        with progress("angles") as (on_start, on_progress):
            result = compute_angles(ckpt_a, ckpt_b, base_ckpt, options, compute, on_progress, on_start)
        emit(plan, result)
    common.show(result)
