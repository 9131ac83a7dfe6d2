"""Run the typer application: every command registered, every error one line."""

from __future__ import annotations

import errno
import importlib
import pkgutil
from pathlib import Path

import typer
from rich.markup import escape

from weightlab.cli.app import app, err_console, one_line, state
from weightlab.errors import WeightlabError

COMMAND_MODULES = sorted(
    m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if m.name not in ("app", "commands", "progress")
)
for _name in COMMAND_MODULES:  # each registers its command on `app`
    importlib.import_module(f"weightlab.cli.{_name}")

try:  # typer ≥ 0.24 vendors its own click
    from typer._click.core import Context
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover - older typer uses click itself
    from click import ClickException, Context


def _plain_help(command) -> None:
    """Help as written: a flag shows no type (typer would print `<bool>`), and brackets are text, not
    rich markup (which would swallow `[default: all]` and `weightlab[ray]`)."""
    help_option = command.get_help_option(Context(command))
    for param in [*command.params, *([help_option] if help_option else [])]:
        if getattr(param, "is_flag", False):
            param.metavar = ""
        if getattr(param, "help", None) and "\\[" not in param.help:
            param.help = param.help.replace("[", "\\[")
    for sub in getattr(command, "commands", {}).values():
        _plain_help(sub)


def run(args: list[str]) -> int:
    """Exit code of `weightlab ARGS`: 0, 2 for bad input (one line on stderr), 1 for a bug."""
    state["debug"] = "--debug" in args
    try:
        command = typer.main.get_command(app)
        _plain_help(command)
        result = command.main(args=args, prog_name="weightlab", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except typer.Exit as e:
        return e.exit_code
    except ClickException as e:  # unknown option, wrong type, missing argument
        if not e.format_message().strip():  # no arguments at all: the help was shown, nothing to add
            return e.exit_code
        ctx = getattr(e, "ctx", None)
        where = f"{ctx.command_path}: " if ctx is not None else ""
        return _error(f"{where}{e.format_message()}", e.exit_code)
    except (WeightlabError, OSError) as e:
        if state["debug"]:
            raise
        if isinstance(e, OSError) and e.errno == errno.EPIPE:
            return 1  # the reader of our stdout went away (`| head`): nothing to say
        text = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename else str(e)
        return _error(text, 2)


def _error(text: str, code: int) -> int:
    err_console.print(f"[bold red]error:[/] {escape(one_line(text))}", highlight=False, soft_wrap=True)
    return code
