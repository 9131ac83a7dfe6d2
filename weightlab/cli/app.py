"""The typer application and the options every command shares."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

from weightlab.domains import Int
from weightlab.io.outputs import Output, OutputPlan
from weightlab.report.document import write_report
from weightlab.report.export import to_csv, to_json

app = typer.Typer(
    name="weightlab",
    help="Look inside model checkpoints and operate on them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
)
# Piped output keeps whole tables instead of folding them to 80 columns.
console = Console(width=None if sys.stdout.isatty() else 180)
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
ReportOpt = typer.Option(None, "--report", help="Also write a self-contained HTML report.", metavar="FILE.html")


class _RateColumn(ProgressColumn):
    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        return Text(f"{task.speed:.1f} {self.unit}/s" if task.speed else "", style="cyan")


@contextmanager
def progress(description: str, unit: str = "matrices") -> Iterator[tuple[Callable[[int], None], Callable[[int], None]]]:
    """A progress bar on stderr; yields (on_start(total), on_progress(advance)) callbacks."""
    with Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  _RateColumn(unit), TimeElapsedColumn(), console=err_console, transient=True) as bar:
        task = bar.add_task(description, total=None)
        yield (lambda total: bar.update(task, total=total)), (lambda n: bar.advance(task, n))


def outputs(force: bool, inputs: Sequence[object], **named: Optional[Path | str]) -> OutputPlan:
    """The command's output plan, checked against the inputs before any work. Each keyword names
    an option (`residual_out_dir` is `--residual-out`, `out_dir`/`out_file` are `-o`); `plots` and
    names ending in `_dir` are folders, the others files."""
    flags = {"out_dir": "-o", "out_file": "-o", "markdown_assets_dir": "--markdown (its _assets folder)"}
    planned = [Output(flags.get(name, "--" + name.removesuffix("_dir").replace("_", "-")), path,
                      directory=name == "plots" or name.endswith("_dir"))
               for name, path in named.items() if path not in (None, "")]
    return OutputPlan([i for i in inputs if i is not None], planned, force)


def emit(plan: OutputPlan, payload: dict, rows: list[dict], draw: Callable[[Path], list[Path]] | None = None) -> None:
    """Write a result's JSON, CSV, plots and report to the plan's outputs (committed together)."""
    if "--json" in plan:
        plan.write_text("--json", to_json(payload))
    if "--csv" in plan:
        plan.write_text("--csv", to_csv(rows))
    if "--plots" in plan and draw is not None:
        folder = plan.path("--plots")
        folder.mkdir()
        draw(folder)
    if "--report" in plan:
        write_report([payload], plan.path("--report"))


def check_rows(rows: int) -> int:
    Int(0).check("--rows", rows)
    return rows


def show_problems(problems: list[str]) -> None:
    """Notes about the inputs (unmatched tensors, shape mismatches) on stderr."""
    for line in problems:
        err_console.print(f"[yellow]note:[/] {line}", highlight=False)


def quiet_when_stdout(*paths: Optional[Path | str]) -> bool:
    """Tables go to the terminal unless a machine output is streamed to stdout."""
    return any(str(p) == "-" for p in paths if p is not None)


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors.")) -> None:
    """weightlab: spectra, subspace angles, Gaussianity, task-specific directions, merging and LoRA surgery.

    Example: weightlab inspect model.safetensors
    """
    state["debug"] = debug
