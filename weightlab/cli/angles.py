"""`weightlab angles`: principal angles between the top singular subspaces of two checkpoints."""

from __future__ import annotations

from pathlib import Path

import typer

from weightlab.cli.app import Common, analysis_command
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
    from weightlab.api.analyses import angles as run_angles

    common.show(run_angles.core(a, b, base, options=options, run=common.run()))
