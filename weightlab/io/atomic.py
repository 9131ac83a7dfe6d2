"""Outputs appear whole or not at all: write beside the destination, then rename."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from weightlab.errors import OutputExists

STDOUT = "-"


def ensure_writable(dest: str | Path, force: bool) -> None:
    """Fail before any work when `dest` exists and overwriting was not asked for."""
    if str(dest) != STDOUT and Path(dest).exists() and not force:
        raise OutputExists("already exists; pass --force to overwrite", dest)


@contextmanager
def atomic_path(dest: str | Path, force: bool = False, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path in `dest`'s parent; on success it replaces `dest`, on error it vanishes."""
    dest = Path(dest)
    ensure_writable(dest, force)
    dest.parent.mkdir(parents=True, exist_ok=True)
    prefix, suffix = f".{dest.name}.", ".partial"
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=dest.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=dest.parent)
        os.close(fd)
        tmp = Path(name)
    os.chmod(tmp, (0o777 if directory else 0o666) & ~_umask())  # mkstemp/mkdtemp make private ones
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    _replace(tmp, dest)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _replace(tmp: Path, dest: Path) -> None:
    if dest.is_dir() and not dest.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
        os.rename(dest, old / dest.name)
        os.rename(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)  # atomic for files, and for a directory onto a missing path


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_text(dest: str | Path, text: str, force: bool = False) -> None:
    """Write text to a file atomically, or to stdout when `dest` is "-"."""
    if str(dest) == STDOUT:
        sys.stdout.write(text)
        return
    with atomic_path(dest, force) as tmp:
        tmp.write_text(text)
