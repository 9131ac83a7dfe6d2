"""A persistent cache of matrix decompositions, keyed by the matrices' content.

A bank of fine-tunes analysed against one base, or a re-run, decomposes each matrix once: the
base's, the fine-tune's and the update's (`compute.spectra`). The key is a SHA-256 of each
tensor's bytes, shape and dtype, the device kind, what the entry holds and the format version,
so an edited tensor, another precision or another device never reads a stale entry. Entries are
safetensors files written to a private temporary name and renamed into place (atomic on POSIX),
so concurrent runs never see half an entry: two writers of one key write the same bytes, and the
last rename wins. When the folder outgrows its bound, the least recently used entries go first
(a hit refreshes an entry's time), but never one this run wrote or used: a pass over more
matrices than the bound holds would evict each entry before its reuse and keep nothing, so a run
that fills the cache keeps its first entries, says so once, and the next run hits them.

An entry is trusted only when it proves itself (`DecompositionCache.get`): it must be a regular
file (opened without following links and without blocking, so a named pipe cannot hang a run),
carry a SHA-256 over its own tensors and its key (so a flipped bit, a truncation or another
entry's file copied in its place fails), and hold finite values of the shapes and dtypes the
matrix asks for. Anything else is a miss: the entry is deleted, recomputed, and a note says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load, save

from weightlab.compute.gram import GramSpectrum
from weightlab.display import human_bytes
from weightlab.io.files import NotARegularFile, read_regular
from weightlab.options import DEFAULT_CACHE_GIB, CacheOptions

FORMAT = "weightlab.gram/3"  # /2: entries carry their checksum; /3: keys over tensor digests
DEFAULT_BYTES = int(DEFAULT_CACHE_GIB * 2**30)
SUFFIX = ".gram.safetensors"
MAX_HEADER = 1 << 16  # an entry's header holds three tensors and two strings
log = logging.getLogger("weightlab")


class DamagedEntry(Exception):
    """A cache entry that does not prove itself (why in the message)."""


def default_folder() -> Path:
    """$WEIGHTLAB_CACHE, else $XDG_CACHE_HOME/weightlab/decompositions, else ~/.cache/…"""
    folder = CacheOptions().folder
    assert folder is not None  # the cache is on unless --no-cache
    return folder


def tensor_digest(w: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes with its shape, dtype and device kind."""
    digest = hashlib.sha256(f"{tuple(w.shape)}|{w.dtype}|{w.device.type}|".encode())
    digest.update(w.detach().contiguous().cpu().view(torch.uint8).numpy().data)
    return digest.hexdigest()


def entry_key(kind: str, *digests: str) -> str:
    """The key of an entry holding `kind` (e.g. how many vectors) of the tensors of `digests`."""
    return hashlib.sha256("|".join((FORMAT, kind, *digests)).encode()).hexdigest()


def content_key(w: torch.Tensor, kind: str = "") -> str:
    """The key of an entry holding `kind` of one 2-D tensor."""
    return entry_key(kind, tensor_digest(w))


@dataclass(frozen=True)
class DecompositionCache:
    folder: Path
    max_bytes: int = DEFAULT_BYTES
    # this run's entries are those touched since (a second early: file times come from a coarser clock)
    since: float = field(default_factory=lambda: time.time() - 1.0)
    _full: list[bool] = field(default_factory=list, compare=False, repr=False)  # said once

    @classmethod
    def of(cls, options: CacheOptions) -> DecompositionCache | None:
        """The cache `options` describe (None with --no-cache). The command's output plan checks
        its folder against the inputs and outputs (`Output.in_place`)."""
        folder = options.folder
        if folder is None:
            return None
        cache = cls(folder, int(options.cache_size * 2**30))
        cache.sweep()
        return cache

    def sweep(self) -> None:
        """Remove entries half written by a process that has ended (killed between write and rename):
        `.KEY.PID.RANDOM.partial` files whose PID no longer runs on this machine."""
        for temp in self.folder.glob("*/.*.partial"):
            try:
                pid = int(temp.name.split(".")[2])
                os.kill(pid, 0)
            except ProcessLookupError:
                temp.unlink(missing_ok=True)
            except (ValueError, IndexError, OSError):
                continue  # not ours, or a process we may not signal: alive

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}{SUFFIX}"

    def get(self, key: str, shape: tuple[int, ...], columns: int | None) -> GramSpectrum | None:
        """The entry of `key` for a matrix of `shape` with its top `columns` Gram eigenvectors (all
        when None, none when 0), or None: missing, or damaged (then deleted, with a note)."""
        path = self.path(key)
        try:
            spectrum = read_entry(path, key, shape, columns)
            os.utime(path)
        except FileNotFoundError:
            return None
        except (OSError, DamagedEntry) as e:
            log.warning("%s: damaged decomposition cache entry (%s); deleted and recomputed", path, e)
            if not path.is_dir():
                path.unlink(missing_ok=True)
            return None
        return spectrum

    def put(self, key: str, spectrum: GramSpectrum) -> None:
        """Store an entry; a full disk or an unwritable folder costs speed, never the run."""
        path = self.path(key)
        temp = path.with_name(f".{key[:16]}.{os.getpid()}.{secrets.token_hex(6)}.partial")
        tensors = {"S": spectrum.S.contiguous(), "tall": torch.tensor(spectrum.tall)}
        if spectrum.E is not None:
            tensors["E"] = spectrum.E.contiguous()
        entry = save(tensors, metadata={"format": FORMAT, "sha256": entry_digest(key, tensors)})
        if not self._room_for(len(entry)):
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(temp, "xb") as file:  # the user's file mode (safetensors' own writer makes 0600 files)
                file.write(entry)
            os.replace(temp, path)
        except OSError:
            temp.unlink(missing_ok=True)
            return
        self.evict()

    def entries(self) -> list[tuple[float, int, Path]]:
        found = []
        for path in self.folder.glob(f"*/*{SUFFIX}"):
            try:
                stat = path.stat()
            except OSError:
                continue
            found.append((stat.st_mtime, stat.st_size, path))
        return found

    def _room_for(self, size: int) -> bool:
        """Whether an entry of `size` bytes fits beside this run's own entries (older ones make
        way); the first time it does not, a warning says so."""
        own = sum(nbytes for mtime, nbytes, _ in self.entries() if mtime >= self.since)
        if own + size <= self.max_bytes:
            return True
        if not self._full:
            self._full.append(True)
            log.warning(
                "%s: the decomposition cache is full (%s, --cache-size) with this run's entries: later "
                "decompositions are not kept; raise --cache-size to keep them all",
                self.folder,
                human_bytes(self.max_bytes),
            )
        return False

    def evict(self) -> None:
        """Remove least recently used entries until the folder is within its bound."""
        entries = sorted(self.entries())
        total = sum(size for _, size, _ in entries)
        for _, size, path in entries:
            if total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size


def entry_digest(key: str, tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the key and every tensor's name, dtype, shape and bytes: an entry's own proof."""
    digest = hashlib.sha256(f"{FORMAT}|{key}".encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        digest.update(f"|{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    return digest.hexdigest()


def read_entry(path: Path, key: str, shape: tuple[int, ...], columns: int | None) -> GramSpectrum:
    """Entry `key` for a matrix of `shape` with `columns` eigenvectors (all when None, none when
    0), proven (`DamagedEntry` if not)."""
    try:
        data = read_regular(path)
    except NotARegularFile:
        raise DamagedEntry("not a regular file") from None
    if len(data) < 8 or struct.unpack("<Q", data[:8])[0] > min(MAX_HEADER, len(data) - 8):
        raise DamagedEntry("truncated")
    try:
        header = json.loads(data[8 : 8 + struct.unpack("<Q", data[:8])[0]])
        metadata = header["__metadata__"]
        stored = metadata["sha256"]
        tensors = load(data)
    except Exception as e:  # any parse failure of untrusted bytes is damage
        raise DamagedEntry(f"unreadable: {type(e).__name__}") from None
    if metadata != {"format": FORMAT, "sha256": stored}:
        raise DamagedEntry("not an entry of this format")
    if set(tensors) != ({"S", "tall"} if columns == 0 else {"S", "E", "tall"}):
        raise DamagedEntry("wrong tensors")
    if stored != entry_digest(key, tensors):
        raise DamagedEntry("checksum mismatch")
    m, n = shape
    r = min(m, n)
    S, E, tall = tensors["S"], tensors.get("E"), tensors["tall"]
    vectors = torch.empty(r, 0) if E is None else E
    if (S.dtype, tuple(S.shape), vectors.dtype, tuple(vectors.shape), tall.dtype, tuple(tall.shape)) != (
        torch.float64,
        (r,),
        torch.float32,
        (r, r if columns is None else min(columns, r)),
        torch.bool,
        (),
    ) or bool(tall) != (m > n):
        raise DamagedEntry("wrong shape or dtype")
    if not (bool(torch.isfinite(S).all()) and bool(torch.isfinite(vectors).all())) or bool((S < 0).any()):
        raise DamagedEntry("non-finite or negative values")
    return GramSpectrum(S, E, bool(tall))
