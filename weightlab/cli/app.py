"""The typer application and the options every command shares.

Nothing here imports a numerical library (torch, scipy, matplotlib): `--help`, `--version` and a
refused option or input answer at once, and a command imports the library when it runs. Each
command's own options come from its options dataclass (`weightlab.options`): declared once.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import os
import sys
import typing
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table as RichTable
from rich.text import Text

from weightlab.cli.progress import progress as report_progress
from weightlab.compute.progress import Callbacks
from weightlab.domains import Int
from weightlab.options import RUN_OPTIONS, Checked
from weightlab.report.tables import NAME_WIDTH, one_line, short_name, table
from weightlab.results import Result, Table

if TYPE_CHECKING:
    from weightlab.api.frame import Run

try:  # typer ≥ 0.24 vendors its own click
    from typer._click.core import ParameterSource
    from typer._click.globals import get_current_context
except ImportError:  # pragma: no cover - older typer uses click itself
    from click import get_current_context
    from click.core import ParameterSource

app = typer.Typer(
    name="weightlab",
    help="Look inside model checkpoints and operate on them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
)
# Piped output keeps whole tables instead of folding them to 80 columns, unless $COLUMNS says otherwise.
console = Console(width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 180)
err_console = Console(stderr=True)
state = {"debug": False}


def progress(description: str, unit: str = "matrices") -> AbstractContextManager[Callbacks]:
    """Progress of long work on stderr: (on_start(total), on_progress(advance)) callbacks."""
    return report_progress(err_console, description, unit)


def fitted(t: Table, body: list[list[Any]], width: int) -> RichTable:
    """`t` with as many of its columns, from the left (tables put what matters most first), as a
    terminal `width` characters wide shows whole; the caption names the others."""
    kept = len(t.columns)
    while True:
        dropped = t.columns[kept:]
        caption = "; ".join(
            filter(
                None,
                [
                    t.caption,
                    f"{len(dropped)} more columns in a wider terminal and in the JSON: {', '.join(dropped)}"
                    if dropped
                    else "",
                ],
            )
        )
        shown = table(
            t.title,
            t.columns[:kept],
            [r[:kept] for r in body],
            numeric_from=min(t.numeric_from, kept),
            caption=caption or None,
        )
        if kept == 1 or console.measure(shown, options=console.options.update_width(10**4)).maximum <= width:
            return shown
        kept -= 1


def show(result: Result, rows: int | None = None) -> None:
    """The result for a person: notes about the inputs, its tables (the first cut to `rows`, tensor
    names shortened), then its summary lines."""
    show_problems(result.problems_found())
    for i, t in enumerate(result.tables()):
        body = t.rows[:rows] if i == 0 and rows is not None else t.rows
        if t.names:
            body = [[short_name(r[0], NAME_WIDTH, drop_layer=True), *r[1:]] for r in body]
        console.print(fitted(t, body, console.width))
    for line in result.lines():
        console.print(Text(one_line(line)), highlight=False)


@dataclass
class Common:
    """The options every analysis command shares (added to it by `analysis_command`)."""

    rows: int
    device: str
    threads: int | None
    json_out: str | None
    csv_out: str | None
    plots: Path | None
    report: Path | None
    force: bool
    ray: str | None = None  # experts has no --ray
    ray_timeout: float | None = None
    dtype: str = "float32"  # gaussian and experts have no --dtype

    def __post_init__(self) -> None:
        check_rows(self.rows)

    def run(self) -> Run:
        """How the API function runs: these options, those typed on the command line, progress on stderr."""
        from weightlab.api.frame import Run

        return Run(
            self.device,
            self.dtype,
            self.threads,
            self.ray,
            self.ray_timeout,
            self.json_out,
            self.csv_out,
            self.plots,
            self.report,
            self.force,
            given_names(),
            progress,
        )

    def show(self, result: Result) -> None:
        if not quiet_when_stdout(self.json_out, self.csv_out):
            show(result, self.rows)


@dataclass
class Operation:
    """The options every command that writes a model shares (added to it by `operation_command`):
    where the model goes, where the maths runs, and the record of what was done (`--json`,
    `--report`). A command's own `--dtype`, where it has one, is the dtype of what it writes."""

    out: Path
    threads: int | None
    json_out: str | None
    report: Path | None
    force: bool
    device: str = "cpu"  # slim-experts has no --device (nor --ray): it averages on the CPU
    ray: str | None = None
    ray_timeout: float | None = None

    def run(self, plots: Path | None = None) -> Run:
        """How the API function runs: these options (the model's folder is its own `out`), those
        typed on the command line, progress on stderr."""
        from weightlab.api.frame import Run

        return Run(
            self.device,
            threads=self.threads,
            ray=self.ray,
            ray_timeout=self.ray_timeout,
            json=self.json_out,
            plots=plots,
            report=self.report,
            force=self.force,
            given=given_names(),
            progress=progress,
        )

    def show(self, result: Result, *written: str) -> None:
        """The result's tables and lines, then where the outputs went (unless JSON goes to stdout)."""
        if quiet_when_stdout(self.json_out):
            return
        show(result)
        for line in written:
            console.print(Text(one_line(line)), highlight=False)


# Each shared option once: its flags and help are `options.RUN_OPTIONS` (what the Python API takes
# as keywords); here the command line's defaults and metavars. The fields of `Common` and
# `Operation` are these options (`json_out`/`csv_out` are `json`/`csv`).
RUN_NAME = {"json_out": "json", "csv_out": "csv"}
_CLI_DEFAULTS: dict[str, tuple[Any, str | None]] = {
    "out": (..., None),
    "device": ("auto", None),
    "threads": (None, "N"),
    "dtype": ("float32", None),
    "json_out": (None, "FILE"),
    "csv_out": (None, "FILE"),
    "plots": (None, "DIR"),
    "report": (None, "FILE.html"),
    "force": (False, None),
    "ray": (None, "ADDRESS"),
    "ray_timeout": (None, "SECONDS"),
}
SHARED_OPTIONS = {
    "rows": typer.Option(25, "--rows", help="Rows shown in the terminal table (all go to --json/--csv)."),
    **{
        name: typer.Option(
            default,
            *RUN_OPTIONS[RUN_NAME.get(name, name)][0],
            help=RUN_OPTIONS[RUN_NAME.get(name, name)][1],
            metavar=metavar,
        )
        for name, (default, metavar) in _CLI_DEFAULTS.items()
    },
}
JsonOpt, CsvOpt, ForceOpt, PlotsOpt, DeviceOpt = (
    SHARED_OPTIONS[n] for n in ("json_out", "csv_out", "force", "plots", "device")
)


def shared_parameters(cls: type, leave_out: Sequence[str] = ()) -> list[inspect.Parameter]:
    """The command-line options of a shared-options dataclass (`Common`, `Operation`): one per
    field, in field order, flags and help from `SHARED_OPTIONS`. A field left out takes its default."""
    hints = typing.get_type_hints(cls)
    return [
        inspect.Parameter(
            f.name, inspect.Parameter.KEYWORD_ONLY, default=SHARED_OPTIONS[f.name], annotation=hints[f.name]
        )
        for f in dataclasses.fields(cls)
        if f.name not in leave_out
    ]


def options_parameters(cls: type) -> list[inspect.Parameter]:
    """The command-line options of an options dataclass: one per field declared with
    `domains.option`, with its default, flags and help from the declaration."""
    hints = typing.get_type_hints(cls)
    return [
        inspect.Parameter(
            f.name,
            inspect.Parameter.KEYWORD_ONLY,
            annotation=hints[f.name],
            default=typer.Option(f.default, *f.metadata["flags"], help=f.metadata["help"]),
        )
        for f in dataclasses.fields(cls)
        if "flags" in f.metadata
    ]


def _options_classes(parameters: Sequence[inspect.Parameter]) -> dict[str, type]:
    return {
        p.name: p.annotation for p in parameters if isinstance(p.annotation, type) and issubclass(p.annotation, Checked)
    }


def command(
    *,
    name: str | None = None,
    common: tuple[type, Callable[[], list[inspect.Parameter]]] | None = None,
    **settings: Any,
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register a command. A parameter annotated with an options dataclass (`SpectrumOptions`)
    becomes that dataclass's options on the command line, and the function receives the built,
    checked dataclass; with `common` = (a dataclass, its parameters), the shared options become
    `common:` that dataclass (`Common` for analyses, `Operation` for commands that write models)."""

    def register(fn: Callable[..., None]) -> Callable[..., None]:
        own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name != "common"]
        classes = _options_classes(own)
        declared = [p for p in own if p.name not in classes]
        expanded = {name: options_parameters(cls) for name, cls in classes.items()}
        shared = common[1]() if common else []
        parameters = declared + [p for ps in expanded.values() for p in ps] + shared
        names = [p.name for p in parameters]
        assert len(names) == len(set(names)), f"{fn.__name__}: an option is declared twice"

        @functools.wraps(fn)
        def run(**kwargs: Any) -> None:
            for name, cls in classes.items():
                kwargs[name] = cls(**{p.name: kwargs.pop(p.name) for p in expanded[name]})
            if common:
                kwargs["common"] = common[0](**{p.name: kwargs.pop(p.name) for p in shared})
            fn(**kwargs)

        run.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in parameters}
        return app.command(name, **settings)(run)

    return register


def analysis_command(
    name: str | None = None, *, precision: bool = True, ray: bool = True
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register an analysis command (`name`: when not the function's): its own arguments, its
    options dataclass, and the shared options (rows, device, threads, dtype unless
    `precision=False`, outputs, force, Ray unless `ray=False`) as `common: Common`, added here once
    for every command."""
    leave_out = (() if precision else ("dtype",)) + (() if ray else ("ray", "ray_timeout"))
    return command(name=name, common=(Common, lambda: shared_parameters(Common, leave_out)))


def operation_command(
    name: str, *, local: bool = False, **settings: Any
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register a command that writes a model: its own arguments and options dataclass, and the
    shared `-o`, `--device` and `--ray` (unless `local`: its maths runs here, on the CPU),
    `--threads`, `--json`, `--report` and `--force` as `common: Operation`, added here once for
    every such command."""
    leave_out = ("device", "ray", "ray_timeout") if local else ()
    return command(name=name, common=(Operation, lambda: shared_parameters(Operation, leave_out)), **settings)


def given_names() -> frozenset[str]:
    """The options typed on the command line, by their name in the Python API."""
    ctx = get_current_context(silent=True)
    if ctx is None:
        return frozenset()
    return frozenset(
        RUN_NAME.get(n, n) for n in ctx.params if ctx.get_parameter_source(n) == ParameterSource.COMMANDLINE
    )


def check_rows(rows: int) -> int:
    Int(0).check("--rows", rows)
    return rows


def show_problems(problems: list[str]) -> None:
    """Notes about the inputs (unmatched tensors, shape mismatches) on stderr, one line each."""
    for line in problems:
        err_console.print(f"[yellow]note:[/] {escape(one_line(line))}", highlight=False, soft_wrap=True)


class _Notes(logging.Handler):
    """The library's notes (logger "weightlab", e.g. a damaged cache entry replaced) as `note:` lines."""

    def emit(self, record: logging.LogRecord) -> None:
        show_problems([record.getMessage()])


_library_log = logging.getLogger("weightlab")
_library_log.addHandler(_Notes())
_library_log.propagate = False


def quiet_when_stdout(*paths: Path | str | None) -> bool:
    """Tables go to the terminal unless a machine output is streamed to stdout."""
    return any(str(p) == "-" for p in paths if p is not None)


def _version(asked: bool) -> None:
    if asked:
        from importlib.metadata import version

        console.print(f"weightlab {version('weightlab')}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
    version: bool = typer.Option(
        False, "--version", is_eager=True, callback=_version, help="Print weightlab's version and exit."
    ),
) -> None:
    """weightlab: spectra, subspace angles, Gaussianity, task-specific directions, merging and LoRA surgery.

    Example: weightlab inspect model.safetensors
    """
    state["debug"] = debug
