"""Command-line interface: a thin layer that parses options, calls the library, renders results.

`main` stays light on purpose: it installs the interrupt handlers before the heavy imports
(torch, transformers), so Ctrl-C or SIGTERM at any moment ends in one line and exit 128 + signal.
A signal that arrives while a module is being imported waits until the outermost import returns
(watched with `sys.setprofile` only while a signal is held): an exception raised inside an import
leaves the module half made (numpy then refuses to load again, and the way out ends in a
traceback or an abort). Once the command's work is done, the process
exits with its code whatever arrives.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

from weightlab.errors import Interrupted
from weightlab.interrupts import HANDLED_SIGNALS, written

IMPORT_MACHINERY = "<frozen importlib"  # the file name of importlib's frames

_held: list[int] = []


def _importing(frame: FrameType | None) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith(IMPORT_MACHINERY):
            return True
        frame = frame.f_back
    return False


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    if _importing(frame):  # held until the outermost import returns (`_deliver_after_import`)
        if signum not in _held:
            _held.append(signum)
        sys.setprofile(_deliver_after_import)
        return
    raise Interrupted(signum)


def _deliver_after_import(frame: FrameType, event: str, arg: object) -> None:
    """While a signal is held: at the return of the outermost import, deliver it."""
    if event == "return" and frame.f_code.co_filename.startswith(IMPORT_MACHINERY) and not _importing(frame.f_back):
        sys.setprofile(None)
        if _held:
            first = _held[0]
            _held.clear()
            raise Interrupted(first)


def _interrupted_line(signum: int) -> str:
    name = signal.Signals(signum).name
    if written:
        return f"interrupted ({name}) after its outputs were written: {', '.join(written)}\n"
    return f"interrupted ({name}): nothing was written\n"


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and exit code 2; interrupts 130/143."""
    args = sys.argv[1:] if argv is None else [str(a) for a in argv]
    previous = {s: signal.signal(s, _raise_interrupted) for s in HANDLED_SIGNALS}
    written.clear()
    try:
        from weightlab.cli.commands import run  # after the handlers: an interrupt while importing is handled

        code = run(args)
    except Interrupted as e:
        sys.stderr.write(_interrupted_line(e.signum))
        code = 128 + e.signum
    finally:
        sys.setprofile(None)
        _held.clear()
        for s, handler in previous.items():
            # the program itself (no argv): the work is done, so nothing may turn its exit code into a signal's
            signal.signal(s, signal.SIG_IGN if argv is None else handler)
    sys.exit(code)
