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
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from weightlab.compute.progress import Callbacks
from weightlab.display import fmt, human_bytes

PLAIN_EVERY = 10.0  # seconds between two plain progress lines


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
    3.1 matrices/s, about 20 s left`, and a last line when any was written. Where the work counts
    bytes too, the share, the rate and the time left follow the bytes (a 7B model's embedding
    weighs as much as 3,000 of its norms): `merge: 12/291 tensors, 2.1 GB of 54.0 GB (4%),
    150.0 MB/s, about 5 min 46 s left`."""

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
        self.total_bytes = 0
        self.done = self.done_bytes = 0
        self.started = self.last = clock()
        self.lines = 0

    def start(self, total: int, nbytes: int = 0) -> None:
        self.total, self.total_bytes = total, nbytes

    def advance(self, n: int, nbytes: int = 0) -> None:
        self.done += n
        self.done_bytes += nbytes
        if self.clock() - self.last >= self.every and self.done != self.total:  # the last line says "done"
            self._line()

    def finish(self) -> None:
        if self.lines:
            self.write(
                f"{self.description}: {self.done}{'' if self.total is None else f'/{self.total}'} {self.unit}"
                + (f", {human_bytes(self.done_bytes)}" if self.total_bytes else "")
                + f" in {duration(self.clock() - self.started)}"
            )

    def _line(self) -> None:
        now = self.clock()
        elapsed = max(now - self.started, 1e-9)
        text = f"{self.description}: {self.done}"
        if self.total_bytes:
            share = self.done_bytes / self.total_bytes
            rate = self.done_bytes / elapsed
            left = (self.total_bytes - self.done_bytes) / rate if rate > 0 else None
            text += f"/{self.total} {self.unit}, {human_bytes(self.done_bytes)} of {human_bytes(self.total_bytes)}"
            text += f" ({100 * share:.0f}%), {human_bytes(rate)}/s"
        else:
            rate = self.done / elapsed
            left = (self.total - self.done) / rate if self.total and rate > 0 else None
            text += (
                f"/{self.total} {self.unit} ({100 * self.done / self.total:.0f}%)" if self.total else f" {self.unit}"
            )
            text += f", {fmt(rate)} {self.unit}/s"
        if left is not None:
            text += f", about {duration(left)} left"
        self.write(text)
        self.last = now
        self.lines += 1


class _Done(ProgressColumn):
    """`12/291 tensors`, and `2.1/54.0 GB` where bytes are counted (the bar then follows bytes)."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        count, total = task.fields.get("count", 0), task.fields.get("count_total")
        text = f"{count}/{total if total is not None else '?'} {self.unit}"
        if task.fields.get("bytes") and task.total:
            text += f", {human_bytes(task.completed)} of {human_bytes(task.total)}"
        return Text(text, style="green")


class _Rate(ProgressColumn):
    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        if not task.speed:
            return Text("")
        return Text(
            f"{human_bytes(task.speed)}/s" if task.fields.get("bytes") else f"{task.speed:.1f} {self.unit}/s",
            style="cyan",
        )


@contextmanager
def progress(console: Console, description: str, unit: str = "matrices") -> Iterator[Callbacks]:
    """Progress of `description` on `console` (stderr): yields (on_start(total, nbytes),
    on_progress(advance, nbytes)); the bar, the rate and the time left follow bytes when the
    work counts them, else the count."""
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
        _Done(unit),
        _Rate(unit),
        TimeElapsedColumn(),
        TextColumn("elapsed,"),
        TimeRemainingColumn(),
        TextColumn("left"),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task(description, total=None, count=0, count_total=None, bytes=False)
        counted, by_bytes = [0], [False]

        def start(total: int, nbytes: int = 0) -> None:
            by_bytes[0] = nbytes > 0
            bar.update(task, total=nbytes or total, count_total=total, bytes=by_bytes[0])

        def step(n: int, nbytes: int = 0) -> None:
            counted[0] += n
            bar.update(task, advance=nbytes if by_bytes[0] else n, count=counted[0])

        yield start, step


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
