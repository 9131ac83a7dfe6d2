"""Signals held back while a few steps must finish whole: moving outputs into place, removing
staging folders. Inside `deferred()` a SIGINT or SIGTERM is recorded, and delivered to whatever
handler was in place (the command line's, or Python's KeyboardInterrupt in a notebook) as soon
as the outermost such block ends. Imports no numerical library: the command line uses it first.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
written: list[str] = []  # the outputs moved into place so far in this process (the command line resets it)
_state: dict[str, Any] = {"depth": 0, "pending": [], "previous": {}}


def _hold(signum: int, frame: FrameType | None) -> None:
    if signum not in _state["pending"]:
        _state["pending"].append(signum)


@contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back until the block (the outermost one) ends, then deliver them.
    Only the main thread handles signals: elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _state["depth"] == 0:
        previous = {s: signal.getsignal(s) for s in HANDLED_SIGNALS}
        if any(handler is None for handler in previous.values()):  # set outside Python: cannot be put back
            yield
            return
        _state["previous"] = {s: signal.signal(s, _hold) for s in previous}
    _state["depth"] += 1
    try:
        yield
    finally:
        _state["depth"] -= 1
        if _state["depth"] == 0:
            for s, handler in _state["previous"].items():
                signal.signal(s, handler)
            pending, _state["pending"] = _state["pending"], []
            for signum in pending:  # now handled as if it had just arrived
                signal.raise_signal(signum)
