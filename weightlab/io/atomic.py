"""Outputs appear whole or not at all: write beside the destination, then rename.

`--force` replaces a regular file, or a folder that weightlab wrote (it carries the marker file
`.weightlab-output`); never a symbolic link, and never any other folder: a tired user's
`--json ft --force` must not delete the model folder `ft/`.

What is staged beside a destination lives in a private folder its process holds locked: one left by
a process that was killed (SIGKILL, an abort) is removed by the next run that stages there. Moving
into place and removing staging hold SIGINT and SIGTERM back until done (`interrupts.deferred`).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from weightlab.errors import InvalidArgument, OutputConflict, OutputExists
from weightlab.interrupts import deferred

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no locks, folders of dead runs stay
    fcntl = None  # type: ignore[assignment]

STDOUT = "-"
MARKER = ".weightlab-output"
MARKER_TEXT = "This folder was written by weightlab; `--force` may replace it.\n"


def ensure_writable(dest: str | Path, force: bool, directory: bool = False) -> None:
    """Fail before any work when `dest` exists and may not be replaced."""
    if str(dest) == STDOUT or not os.path.lexists(dest):
        return
    path = Path(dest)
    if not force:
        raise OutputExists("already exists; pass --force to overwrite", dest)
    if path.is_symlink():
        raise OutputConflict("is a symbolic link; --force replaces only files and folders weightlab wrote", dest)
    if directory and not path.is_dir():
        raise OutputConflict("exists and is not a folder; --force will not replace it with one", dest)
    if directory and not (path / MARKER).is_file():
        raise OutputConflict(
            f"is a folder weightlab did not write (no {MARKER} in it); --force replaces only "
            "weightlab's own folders: remove it yourself or choose another path",
            dest,
        )
    if not directory and not path.is_file():
        raise OutputConflict("exists and is not a regular file; --force replaces only files here", dest)


STAGE_NAME_BYTES = 64  # of the destination's name in its staging folder's name: any legal name stays legal
LOCK = ".weightlab-lock"  # in each private folder, locked while the process that made it lives


@dataclass
class Staging:
    """A private folder beside a destination. The process that made it holds an exclusive lock on
    the file `LOCK` in it (`flock`, released by the kernel when the process ends, even killed), so
    a later run tells a folder whose process died (SIGKILL, an abort under a memory cap) from one
    in use, and removes it (`sweep`)."""

    path: Path
    lock: int | None = None  # the locked file's descriptor

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        if self.lock is not None:
            os.close(self.lock)
            self.lock = None


def sweep(parent: Path) -> None:
    """Remove the private folders in `parent` whose process has ended: a `.*.partial` folder with
    weightlab's lock file in it that nobody holds. Anything else is left alone."""
    if fcntl is None:
        return
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    for entry in entries:
        if not (entry.name.startswith(".") and entry.name.endswith(".partial") and entry.is_dir(follow_symlinks=False)):
            continue
        try:
            fd = os.open(Path(entry.path) / LOCK, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            continue  # not one of ours
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # its process is alive
        else:
            shutil.rmtree(entry.path, ignore_errors=True)
        finally:
            os.close(fd)


def private_folder(parent: Path, prefix: str) -> Staging:
    """A new locked private folder `PREFIXxxxx.partial` in `parent` (made if missing), after removing
    those whose process died. Made under another name and locked before it takes its own, so a
    sweep never sees it unlocked."""
    parent.mkdir(parents=True, exist_ok=True)
    sweep(parent)
    made = Path(tempfile.mkdtemp(prefix=prefix, suffix=".partial~", dir=parent))
    if fcntl is None:
        final = made.with_name(made.name[:-1])
        os.rename(made, final)
        return Staging(final)
    fd = os.open(made / LOCK, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    final = made.with_name(made.name[:-1])
    os.rename(made, final)
    return Staging(final, fd)


def staging_dir(dest: Path) -> Staging:
    """A private folder beside `dest` (same file system: renames out of it are atomic), named after
    the start of `dest`'s name, so a destination name of any legal length works."""
    short = dest.name.encode()[:STAGE_NAME_BYTES].decode(errors="ignore")
    return private_folder(dest.parent, f".{short}.")


@contextmanager
def scratch_folder(parent: Path | None, prefix: str) -> Iterator[Path]:
    """A locked private folder for a command's intermediate files, in `parent` (None: the system's
    temporary folder), removed when the block ends; a killed run's is removed by the next."""
    stage = private_folder(parent if parent is not None else Path(tempfile.gettempdir()), prefix)
    try:
        yield stage.path
    finally:
        with deferred():
            stage.remove()


@contextmanager
def atomic_path(dest: str | Path, force: bool = False, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; on success it replaces `dest`, on error it vanishes.
    A folder gets weightlab's marker, so a later `--force` may replace it."""
    dest = Path(dest)
    ensure_writable(dest, force, directory)
    stage = staging_dir(dest)
    tmp = stage.path / dest.name
    try:
        if directory:
            tmp.mkdir()
            mark(tmp)
        yield tmp
        with deferred():
            ensure_writable(dest, force, directory)  # again: something may have appeared meanwhile
            replace(tmp, dest, stage.path)
    finally:
        with deferred():
            stage.remove()


def free_bytes(path: str | Path) -> int:
    """Free bytes on the filesystem that holds `path`, or would hold it (its nearest existing parent)."""
    here = Path(path).absolute()
    while not here.exists() and here != here.parent:
        here = here.parent
    return shutil.disk_usage(here).free


def require_free_space(path: str | Path, needed: int, what: str) -> None:
    """Refuse, before any work, an output that cannot fit: `needed` bytes at `path`, with 1% (at
    least 64 MB) to spare for headers and side files."""
    free = free_bytes(path)
    if needed + max(needed // 100, 64 << 20) > free:
        raise InvalidArgument(
            f"{what} needs {needed / 1e9:.2f} GB and {free / 1e9:.2f} GB are free on its filesystem: "
            "free some space or write it elsewhere",
            path,
        )


def mark(folder: Path) -> None:
    """Mark a folder as weightlab's own, so that a later `--force` may replace it."""
    if not (folder / MARKER).exists():
        (folder / MARKER).write_text(MARKER_TEXT)


def replace(new: Path, dest: Path, stage: Path) -> Path | None:
    """Move `new` onto `dest`; an existing `dest` is first moved into `stage` (removed with it).
    Returns where the old `dest` went, if there was one."""
    old = None
    if os.path.lexists(dest):
        old = stage / ".replaced"
        os.rename(dest, old)
    os.rename(new, dest)
    return old


def write_text(dest: str | Path, text: str, force: bool = False) -> None:
    """Write text to a file atomically, or to stdout when `dest` is "-"."""
    if str(dest) == STDOUT:
        sys.stdout.write(text)
        return
    with atomic_path(dest, force) as tmp:
        tmp.write_text(text)
