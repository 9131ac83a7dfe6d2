"""What long work reports as it goes: counts of tensors and the bytes they hold (the command
line shows them as a bar with a rate and the time left, `cli/progress.py`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from weightlab.matching import MatchedTensor


class Progress(Protocol):
    """on_start(total, nbytes) or on_progress(done, nbytes): a count of tensors and the bytes they
    hold in all the sources together (0 where a caller does not count bytes)."""

    def __call__(self, count: int, nbytes: int = 0, /) -> None: ...


def read_bytes(items: Sequence[MatchedTensor], sources: int) -> int:
    """Bytes a pass reads for `items` from `sources` checkpoints (each as the first one stores it)."""
    return sum(item.nbytes for item in items) * sources


Callbacks = tuple[Progress, Progress]  # (on_start, on_progress)
Reporter = Callable[[str, str], AbstractContextManager[Callbacks]]  # (description, unit) -> its callbacks
