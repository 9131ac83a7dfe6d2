"""User errors: one type per kind, each rendered by the CLI as one line naming file and tensor."""

from __future__ import annotations

import reprlib
from pathlib import Path
from typing import Any

_BOUNDED = reprlib.Repr()
_BOUNDED.maxlevel, _BOUNDED.maxstring, _BOUNDED.maxother, _BOUNDED.maxlong = 2, 40, 40, 40
_BOUNDED.maxlist = _BOUNDED.maxtuple = _BOUNDED.maxdict = _BOUNDED.maxset = _BOUNDED.maxfrozenset = 4


def shown(value: Any) -> str:
    """A value the user gave, as a message shows it: its repr cut short, computed only as far as it
    is shown (never the repr of a whole nested or aliased object), on one line."""
    return " ".join(_BOUNDED.repr(value).split())


class WeightlabError(Exception):
    """Base of every error caused by the user's input (not by a bug in weightlab)."""

    def __init__(self, message: str, path: str | Path | None = None, tensor: str | None = None):
        self.message = message
        self.path = None if path is None else str(path)
        self.tensor = tensor
        super().__init__(str(self))

    def __str__(self) -> str:
        where = [p for p in (self.path, f"tensor {self.tensor!r}" if self.tensor else None) if p]
        return ": ".join([*where, self.message])


class CheckpointNotFound(WeightlabError):
    """The path does not exist."""


class NotACheckpoint(WeightlabError):
    """The path exists but holds no format weightlab reads."""


class CorruptCheckpoint(WeightlabError):
    """Truncated file, malformed or oversized header, inconsistent offsets."""


class MissingShard(WeightlabError):
    """An index names a shard file that is not there."""


class MissingTensor(WeightlabError):
    """A tensor asked for by name is not in the checkpoint."""


class ShapeMismatch(WeightlabError):
    """Two checkpoints disagree on a tensor's shape."""


class UnsupportedDtype(WeightlabError):
    """A dtype weightlab cannot read or compute with."""


class UnsupportedLayout(WeightlabError):
    """A tensor whose layout weightlab does not know how to read as a matrix (never guessed)."""


class UnsafePickle(WeightlabError):
    """A legacy pickle holds more than plain tensors; it is refused, never executed."""


class OutputExists(WeightlabError):
    """The output path exists and --force was not given."""


class InvalidArgument(WeightlabError):
    """An option or argument value that cannot work (bad regex, rank too large...)."""


class OutputConflict(WeightlabError):
    """An output would replace, contain or sit inside an input, collide with another output, or
    replace something --force may not (a folder weightlab did not write, a link)."""


class NonFiniteTensor(WeightlabError):
    """A tensor about to be written holds NaN or Inf: nothing is written."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM, raised by the CLI's signal handlers: outputs in progress are removed
    on the way out, exit code 128 + signal. (Not a KeyboardInterrupt: click would swallow it.)"""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
