"""Every output of one command, planned before any work and committed together.

An output that is, contains or lies inside an input is refused, as are two outputs that are the
same path (or one inside the other, or both stdout). Each output is staged in a private folder
beside its destination; when the command succeeds they are all moved into place, and if any move
fails the ones already made are undone. On an error or an interrupt nothing appears.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal

from weightlab.errors import OutputConflict, WeightlabError
from weightlab.interrupts import deferred, written
from weightlab.io.atomic import STDOUT, Staging, ensure_writable, mark, replace, staging_dir
from weightlab.io.hub import cache_folder, parse_hub_id


@dataclass(frozen=True)
class Output:
    """One destination: `option` names it in messages (`--json`, `-o`). An `in_place` folder
    (the decomposition cache) is written where it is, not staged: it is only checked against
    the inputs and the other outputs."""

    option: str
    path: str | Path
    directory: bool = False
    in_place: bool = False

    @property
    def stdout(self) -> bool:
        return str(self.path) == STDOUT


def _real(path: str | Path) -> Path:
    return Path(os.path.realpath(os.path.abspath(os.path.expanduser(str(path)))))


def _inside(inner: Path, outer: Path) -> bool:
    return outer in inner.parents


def input_footprints(path: str | Path) -> list[Path]:
    """What reading `path` touches, links resolved: the path itself (a sharded index: its whole
    folder), the real place of every file of a folder input (a weight file may be a link to
    elsewhere), and for a Hub model ID its repository's cache folder (everything read through an
    ID lies inside it: `hub.confine_snapshot`)."""
    hub = None if Path(path).exists() else parse_hub_id(str(path))
    if hub is not None:
        return [_real(cache_folder(hub[0]))]
    real = _real(path)
    folder = real.parent if real.name.endswith(".index.json") else real
    linked = sorted({_real(p) for p in folder.iterdir() if p.is_symlink() and p.is_file()}) if folder.is_dir() else []
    return [folder, *linked]


def refuse_input_overlap(option: str, path: str | Path, inputs: Iterable[str | Path]) -> None:
    """Refuse a path weightlab will write (an output, the cache) that is, contains or lies inside an input."""
    real = _real(path)
    for given in inputs:
        for footprint in input_footprints(given):
            if real == footprint:
                raise OutputConflict(f"{option} is the input {given}; choose another path", path)
            if _inside(footprint, real):
                raise OutputConflict(f"{option} contains the input {given}; choose another path", path)
            if _inside(real, footprint):
                raise OutputConflict(f"{option} lies inside the input {given}; write outside it", path)


def _require_folder_above(out: Output) -> None:
    """Refuse an output whose place a file takes: a folder output that is a file, or a path below a file."""
    path = Path(out.path)
    if out.directory and out.in_place and path.exists() and not path.is_dir():
        raise OutputConflict(f"{out.option} is a file, not a folder", out.path)
    above = path.absolute().parent
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise OutputConflict(f"{out.option} lies below {above}, which is a file, not a folder", out.path)


def check_outputs(inputs: Iterable[str | Path | None], outputs: Sequence[Output], force: bool) -> None:
    """Refuse, before any work, outputs that would harm an input, collide, or replace what they may not."""
    present = [i for i in inputs if i is not None]
    seen: list[tuple[Output, Path]] = []
    stdout_taken: Output | None = None
    for out in outputs:
        if out.stdout:
            if stdout_taken is not None:
                raise OutputConflict(f"{stdout_taken.option} and {out.option} both write to stdout; send one to a file")
            stdout_taken = out
            continue
        real = _real(out.path)
        refuse_input_overlap(out.option, out.path, present)
        _require_folder_above(out)
        for other, other_real in seen:
            if real == other_real or _inside(real, other_real) or _inside(other_real, real):
                raise OutputConflict(f"{other.option} and {out.option} collide ({other.path}, {out.path})", out.path)
        seen.append((out, real))
        if not out.in_place:
            ensure_writable(out.path, force, out.directory)


class OutputPlan:
    """Use as a context manager around the whole command:

        with OutputPlan(inputs, [Output("--json", path), Output("-o", out, directory=True)], force) as plan:
            write_adapter(plan.path("-o"), ...)      # a fresh path to write to
            plan.write_text("--json", text)

    Writers write to `plan.path(option)` (which does not exist yet); on a clean exit every output
    moves into place, otherwise the staged ones vanish."""

    def __init__(self, inputs: Iterable[str | Path | None], outputs: Sequence[Output | None], force: bool):
        self.outputs = {o.option: o for o in outputs if o is not None and o.path not in (None, "")}
        self.force = force
        check_outputs([i for i in inputs if i is not None], list(self.outputs.values()), force)
        self._stages: dict[str, Staging] = {}
        self._stdout: list[str] = []

    def __contains__(self, option: str) -> bool:
        return option in self.outputs

    def path(self, option: str) -> Path:
        """Where to write `option`'s output now; it moves to its destination at commit."""
        out = self.outputs[option]
        if out.stdout:
            raise OutputConflict(f"{option} cannot be stdout here")
        if option not in self._stages:
            self._stages[option] = staging_dir(Path(out.path))
        return self._stages[option].path / Path(out.path).name

    def write_text(self, option: str, text: str) -> None:
        if self.outputs[option].stdout:
            self._stdout.append(text)
        else:
            self.path(option).write_text(text)

    def __enter__(self) -> OutputPlan:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> Literal[False]:
        with deferred():  # the outputs all move into place, and the staging goes, before an interrupt
            try:
                if exc_type is None:
                    self._commit()
                elif isinstance(exc, WeightlabError) and exc.path is not None:
                    exc.path = self._destination_of(exc.path)
                elif isinstance(exc, OSError) and isinstance(exc.filename, str):  # a full disk, say
                    exc.filename = self._destination_of(exc.filename)
            finally:
                for stage in self._stages.values():
                    stage.remove()
        return False

    def _destination_of(self, path: str) -> str:
        """Where a staged path will land: an error names the user's output, not a hidden
        `.NAME.xxxx.partial` folder beside it."""
        where = Path(os.path.abspath(path))
        for option, stage in self._stages.items():
            dest = Path(self.outputs[option].path)
            staged = Path(os.path.abspath(stage.path / dest.name))
            if where == staged or staged in where.parents:
                return str(dest / where.relative_to(staged))
        return path

    def _commit(self) -> None:
        placed: list[tuple[Path, Path | None]] = []  # (destination, where its old content went)
        try:
            for option, stage in self._stages.items():
                out = self.outputs[option]
                dest, staged = Path(out.path), stage.path / Path(out.path).name
                if not os.path.lexists(staged):
                    continue  # declared but not produced (e.g. no plots to draw)
                if out.directory and staged.is_dir():
                    mark(staged)
                ensure_writable(dest, self.force, out.directory)
                placed.append((dest, replace(staged, dest, stage.path)))
        except BaseException:
            for dest, old in placed:  # undo: the new outputs go, the old ones come back
                shutil.rmtree(dest, ignore_errors=True) if dest.is_dir() else dest.unlink(missing_ok=True)
                if old is not None:
                    os.rename(old, dest)
            raise
        written.extend(str(dest) for dest, _ in placed)
        for text in self._stdout:
            sys.stdout.write(text)


FLAG_OF_OUTPUT = {
    "out_dir": "-o",
    "out_file": "-o",
    "markdown_assets_dir": "--markdown (its _assets folder)",
    "cache_dir": "--cache-dir",
}


def plan_outputs(force: bool, inputs: Sequence[object], **named: Path | str | None) -> OutputPlan:
    """A command's output plan, checked against the inputs before any work. Each keyword names
    an option (`residual_out_dir` is `--residual-out`, `out_dir`/`out_file` are `-o`); `plots` and
    names ending in `_dir` are folders, the others files; `cache_dir` is written in place."""
    planned = [
        Output(
            FLAG_OF_OUTPUT.get(name, "--" + name.removesuffix("_dir").replace("_", "-")),
            path,
            directory=name == "plots" or name.endswith("_dir"),
            in_place=name == "cache_dir",
        )
        for name, path in named.items()
        if path not in (None, "")
    ]
    return OutputPlan([i for i in inputs if isinstance(i, (str, Path))], planned, force)
