"""Command-line interface: a thin layer that parses options, calls the library, renders results."""

from __future__ import annotations

import sys

from rich.markup import escape

from weightlab.cli.app import app, err_console, state
from weightlab.errors import WeightlabError

# Importing the command modules registers their commands on `app`.
from weightlab.cli import inspect as _inspect  # noqa: E402,F401
from weightlab.cli import spectrum as _spectrum  # noqa: E402,F401
from weightlab.cli import gaussian as _gaussian  # noqa: E402,F401
from weightlab.cli import merge as _merge  # noqa: E402,F401
from weightlab.cli import lora as _lora  # noqa: E402,F401
from weightlab.cli import report as _report  # noqa: E402,F401
from weightlab.cli import demo as _demo  # noqa: E402,F401


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and exit code 2."""
    args = sys.argv[1:] if argv is None else argv
    state["debug"] = "--debug" in args
    try:
        app(args=args, prog_name="weightlab")
    except (WeightlabError, OSError) as e:
        if state["debug"]:
            raise
        text = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename else str(e)
        err_console.print(f"[bold red]error:[/] {escape(text)}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/]")
        sys.exit(130)
