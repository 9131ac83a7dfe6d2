"""A persistent cache of base-matrix decompositions, keyed by the matrix's content.

A bank of fine-tunes analysed against one base, or a re-run, decomposes each base matrix once.
The key is a SHA-256 of the tensor's bytes, shape and dtype plus the device kind and the
format version, so an edited tensor, another precision or another device never reads a stale
entry. Entries are safetensors files written to a private temporary name and renamed into
place (atomic on POSIX), so concurrent runs never see half an entry: two writers of one key
write the same bytes, and the last rename wins. A reader that finds an entry gone (evicted by
another run) or unreadable treats it as a miss. When the folder outgrows its bound, the least
recently used entries go first (a hit refreshes an entry's time).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from weightlab.compute.gram import GramSpectrum
from weightlab.domains import Real
from weightlab.io.outputs import refuse_input_overlap

FORMAT = "weightlab.gram/1"
DEFAULT_BYTES = 4 << 30
SUFFIX = ".gram.safetensors"


def default_folder() -> Path:
    """$WEIGHTLAB_CACHE, else $XDG_CACHE_HOME/weightlab/decompositions, else ~/.cache/…"""
    if os.environ.get("WEIGHTLAB_CACHE"):
        return Path(os.environ["WEIGHTLAB_CACHE"])
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "weightlab" / "decompositions"


def content_key(w: torch.Tensor, kind: str = "") -> str:
    """SHA-256 of a 2-D tensor's bytes with its shape, dtype, device kind, the entry format and
    `kind` (what the entry holds, e.g. how many vectors)."""
    digest = hashlib.sha256(f"{FORMAT}|{kind}|{tuple(w.shape)}|{w.dtype}|{w.device.type}|".encode())
    digest.update(w.detach().contiguous().cpu().view(torch.uint8).numpy().data)
    return digest.hexdigest()


@dataclass(frozen=True)
class DecompositionCache:
    folder: Path
    max_bytes: int = DEFAULT_BYTES

    @classmethod
    def at(cls, folder: Path | None, size_gib: float, inputs: Sequence[Path]) -> "DecompositionCache":
        """The cache the CLI uses: `folder` (default `default_folder()`), bounded to `size_gib`,
        refused when it is, contains or lies inside an input (weightlab never writes into inputs)."""
        Real(0).check("--cache-size", size_gib)
        folder = Path(folder).expanduser() if folder is not None else default_folder()
        refuse_input_overlap("--cache-dir", folder, inputs)
        return cls(folder, int(size_gib * 2**30))

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}{SUFFIX}"

    def get(self, key: str) -> GramSpectrum | None:
        path = self.path(key)
        try:
            tensors = load_file(path)
            spectrum = GramSpectrum(tensors["S"], tensors["E"], bool(tensors["tall"]))
            os.utime(path)
        except (OSError, SafetensorError, KeyError, RuntimeError):
            return None
        return spectrum

    def put(self, key: str, spectrum: GramSpectrum) -> None:
        """Store an entry; a full disk or an unwritable folder costs speed, never the run."""
        path, temp = self.path(key), None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle, temp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".partial")
            os.close(handle)
            save_file({"S": spectrum.S.contiguous(), "E": spectrum.E.contiguous(),
                       "tall": torch.tensor(spectrum.tall)}, temp, metadata={"format": FORMAT})
            os.replace(temp, path)
        except OSError:
            if temp:
                Path(temp).unlink(missing_ok=True)
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

    def evict(self) -> None:
        """Remove least recently used entries until the folder is within its bound."""
        entries = sorted(self.entries())
        total = sum(size for _, size, _ in entries)
        for _, size, path in entries:
            if total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size
