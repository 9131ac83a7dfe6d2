"""Command-line interface: a thin layer that parses options, calls the library, renders results.

`main` stays light on purpose: it installs the interrupt handlers before the heavy imports
(torch, transformers), so Ctrl-C or SIGTERM at any moment ends in one line and exit 128 + signal.
"""

from __future__ import annotations

import signal
import sys

from weightlab.errors import Interrupted

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _raise_interrupted(signum: int, frame) -> None:
    raise Interrupted(signum)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and exit code 2; interrupts 130/143."""
    args = sys.argv[1:] if argv is None else [str(a) for a in argv]
    previous = {s: signal.signal(s, _raise_interrupted) for s in HANDLED_SIGNALS}
    try:
        from weightlab.cli.commands import run  # after the handlers: an interrupt while importing is handled

        code = run(args)
    except Interrupted as e:
        sys.stderr.write(f"interrupted ({signal.Signals(e.signum).name}): nothing was written\n")
        code = 128 + e.signum
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    sys.exit(code)
