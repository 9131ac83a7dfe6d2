"""Outputs appear whole or not at all: write beside the destination, then rename.

`--force` replaces a regular file, or a folder that weightlab wrote (it carries the marker file
`.weightlab-output`); never a symbolic link, and never any other folder: a tired user's
`--json ft --force` must not delete the model folder `ft/`.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from weightlab.errors import InvalidArgument, OutputConflict, OutputExists

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


def staging_dir(dest: Path) -> Path:
    """A private temporary folder beside `dest` (same file system: renames out of it are atomic),
    named after the start of `dest`'s name, so a destination name of any legal length works."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    short = dest.name.encode()[:STAGE_NAME_BYTES].decode(errors="ignore")
    return Path(tempfile.mkdtemp(prefix=f".{short}.", suffix=".partial", dir=dest.parent))


@contextmanager
def atomic_path(dest: str | Path, force: bool = False, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; on success it replaces `dest`, on error it vanishes.
    A folder gets weightlab's marker, so a later `--force` may replace it."""
    dest = Path(dest)
    ensure_writable(dest, force, directory)
    stage = staging_dir(dest)
    tmp = stage / dest.name
    try:
        if directory:
            tmp.mkdir()
            mark(tmp)
        yield tmp
        ensure_writable(dest, force, directory)  # again: something may have appeared meanwhile
        replace(tmp, dest, stage)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


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
