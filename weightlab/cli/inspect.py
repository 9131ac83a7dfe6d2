"""`weightlab inspect`: what a checkpoint holds, from headers alone."""

from __future__ import annotations

from pathlib import Path

import typer

from weightlab.cli.app import CsvOpt, ForceOpt, JsonOpt, app, given_names, quiet_when_stdout, show


@app.command()
def inspect(
    checkpoint: Path = typer.Argument(
        ..., help="A .safetensors/.bin file, a (sharded) model folder or a PEFT adapter."
    ),
    name_filter: str | None = typer.Option(None, "--filter", help="Only tensors whose name matches this regex."),
    json_out: str | None = JsonOpt,
    csv_out: str | None = CsvOpt,
    force: bool = ForceOpt,
) -> None:
    """List tensors (name, shape, dtype, parameters, bytes, layer, role) and totals per dtype.

    Example: weightlab inspect ./llama-3-8b --filter 'layers\\.0\\.' --json -
    """
    from weightlab.api.analyses import inspect as run_inspect
    from weightlab.api.frame import Run

    inv = run_inspect.core(
        checkpoint, name_filter, run=Run(json=json_out, csv=csv_out, force=force, given=given_names())
    )
    if not quiet_when_stdout(json_out, csv_out):
        show(inv)
