"""Reading a file that someone else may have planted: a regular file only, never through a link,
never blocking (a named pipe or a device is refused before any read)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

CHUNK = 1 << 20


class NotARegularFile(OSError):
    """The path is a link, a folder, a pipe or a device: not a file to read."""


def regular_chunks(path: str | Path, max_bytes: int | None = None, chunk: int = CHUNK) -> Iterator[bytes]:
    """The bytes of a regular file, `chunk` at a time, opened without following a link and without
    blocking; `NotARegularFile` for anything else, or when it holds more than `max_bytes`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        if os.path.islink(path):
            raise NotARegularFile(f"{path} is a symbolic link") from None
        raise e
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotARegularFile(f"{path} is not a regular file")
        if max_bytes is not None and info.st_size > max_bytes:
            raise NotARegularFile(f"{path} holds {info.st_size} bytes, more than the {max_bytes} expected")
        offset = 0
        while offset < info.st_size:
            data = os.pread(fd, min(chunk, info.st_size - offset), offset)
            if not data:
                break
            offset += len(data)
            yield data
    finally:
        os.close(fd)


def read_regular(path: str | Path, max_bytes: int | None = None) -> bytes:
    """The bytes of a regular file at once (`regular_chunks`)."""
    return b"".join(regular_chunks(path, max_bytes, chunk=1 << 62))
