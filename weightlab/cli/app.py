"""The typer application and the options every command shares."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

app = typer.Typer(
    name="weightlab",
    help="Look inside model checkpoints and operate on them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
)
console = Console()
err_console = Console(stderr=True)
state = {"debug": False}

JsonOpt = typer.Option(None, "--json", help="Write the result as JSON ('-' for stdout).", metavar="FILE")
CsvOpt = typer.Option(None, "--csv", help="Write one row per tensor as CSV ('-' for stdout).", metavar="FILE")
ForceOpt = typer.Option(False, "--force", help="Overwrite existing outputs.")
IncludeOpt = typer.Option(None, "--include", help="Only tensors whose name matches this regex.", metavar="REGEX")
ExcludeOpt = typer.Option(None, "--exclude", help="Skip tensors whose name matches this regex.", metavar="REGEX")
DeviceOpt = typer.Option("auto", "--device", help="auto (GPU when present), cpu, or cuda[:N].")
DtypeOpt = typer.Option("float32", "--dtype", help="Precision of the maths: float32 or float64.")
PlotsOpt = typer.Option(None, "--plots", help="Write PNG plots into this folder.", metavar="DIR")


def quiet_when_stdout(*paths: Optional[Path | str]) -> bool:
    """Tables go to the terminal unless a machine output is streamed to stdout."""
    return any(str(p) == "-" for p in paths if p is not None)


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors.")) -> None:
    """weightlab: spectra, subspace angles, Gaussianity, task-specific directions, merging and LoRA surgery.

    Example: weightlab inspect model.safetensors
    """
    state["debug"] = debug
