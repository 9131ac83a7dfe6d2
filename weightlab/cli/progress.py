"""Progress of long work on stderr: a bar with counts, rate and time left on a terminal; plain lines
at a modest rate when stderr is a pipe or a file (a log, CI), so that a long run is never silent
and a short one prints nothing."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from weightlab.display import fmt

PLAIN_EVERY = 10.0  # seconds between two plain progress lines
Callbacks = tuple[Callable[[int], None], Callable[[int], None]]  # on_start(total), on_progress(advance)


def duration(seconds: float) -> str:
    """`seconds` as a person says it: 45 s, 3 min 20 s, 2 h 05 min."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class PlainProgress:
    """Counts written as lines, one every `every` seconds at most: `spectrum: 12/74 matrices (16%),
    3.1 matrices/s, about 20 s left`, and a last line when any was written."""

    def __init__(
        self,
        description: str,
        unit: str,
        write: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
        every: float = PLAIN_EVERY,
    ):
        self.description, self.unit, self.write, self.clock, self.every = description, unit, write, clock, every
        self.total: int | None = None
        self.done = 0
        self.started = self.last = clock()
        self.lines = 0

    def start(self, total: int) -> None:
        self.total = total

    def advance(self, n: int) -> None:
        self.done += n
        if self.clock() - self.last >= self.every and self.done != self.total:  # the last line says "done"
            self._line()

    def finish(self) -> None:
        if self.lines:
            self.write(
                f"{self.description}: {self.done}{'' if self.total is None else f'/{self.total}'} {self.unit} "
                f"in {duration(self.clock() - self.started)}"
            )

    def _line(self) -> None:
        now = self.clock()
        elapsed = max(now - self.started, 1e-9)
        rate = self.done / elapsed
        text = f"{self.description}: {self.done}"
        if self.total:
            text += f"/{self.total} {self.unit} ({100 * self.done / self.total:.0f}%)"
        else:
            text += f" {self.unit}"
        text += f", {fmt(rate)} {self.unit}/s"
        if self.total and rate > 0:
            text += f", about {duration((self.total - self.done) / rate)} left"
        self.write(text)
        self.last = now
        self.lines += 1


class _Rate(ProgressColumn):
    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        return Text(f"{task.speed:.1f} {self.unit}/s" if task.speed else "", style="cyan")


@contextmanager
def progress(console: Console, description: str, unit: str = "matrices") -> Iterator[Callbacks]:
    """Progress of `description` on `console` (stderr): yields (on_start(total), on_progress(advance))."""
    if not console.is_terminal:
        plain = PlainProgress(
            description, unit, lambda line: console.print(line, highlight=False, markup=False, soft_wrap=True)
        )
        yield plain.start, plain.advance
        plain.finish()
        return
    with Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _Rate(unit),
        TimeElapsedColumn(),
        TextColumn("left"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task(description, total=None)
        yield (lambda total: bar.update(task, total=total)), (lambda n: bar.advance(task, n))


@contextmanager
def stages(console: Console, name: str, total: int) -> Iterator[Callable[[str], None]]:
    """A long job made of `total` stages: yields step(text), which shows `name [i/total] text` (a
    spinner line on a terminal, a plain line otherwise)."""
    count = [0]

    def label(text: str) -> str:
        count[0] += 1
        return f"{name} [{min(count[0], total)}/{total}] {text}"

    if not console.is_terminal:
        yield lambda text: console.print(label(text), highlight=False, markup=False, soft_wrap=True)
        return
    with console.status(f"{name}: starting") as status:
        yield lambda text: status.update(label(text))
