"""One GGUF file (llama.cpp's format): its validated header, metadata and tensor table, and reads
of exactly one tensor's bytes.

Format (little-endian; github.com/ggml-org/ggml docs/gguf.md): "GGUF", version (2 or 3), tensor
count and metadata count (u64), the metadata as key (string), value type (u32), value; then per
tensor its name, dimension count (u32), dimensions innermost first (u64 each), GGML type (u32)
and offset (u64) into the data, which starts at the next multiple of `general.alignment` (32 by
default). A string is a u64 length and UTF-8 bytes; an array is an item type (u32), a count (u64)
and the items. We parse it ourselves, like safetensors headers, so that every count, length,
shape and offset is checked against the file before anything is allocated or read.
"""

from __future__ import annotations

import itertools
import math
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from weightlab.errors import CorruptCheckpoint, NotACheckpoint, UnsupportedDtype

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # version 1 (2023, u32 counts) predates every file in circulation
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NESTING = 4  # arrays of arrays: deeper is no file llama.cpp writes

# GGUF metadata value types: id -> (struct format, size) for the fixed-size ones
SCALARS: dict[int, tuple[str, int]] = {
    0: ("B", 1),  # UINT8
    1: ("b", 1),  # INT8
    2: ("H", 2),  # UINT16
    3: ("h", 2),  # INT16
    4: ("I", 4),  # UINT32
    5: ("i", 4),  # INT32
    6: ("f", 4),  # FLOAT32
    7: ("?", 1),  # BOOL
    10: ("Q", 8),  # UINT64
    11: ("q", 8),  # INT64
    12: ("d", 8),  # FLOAT64
}
STRING, ARRAY = 8, 9


@dataclass(frozen=True)
class GGMLType:
    """A GGML tensor type: `block` values stored in `size` bytes."""

    id: int
    name: str
    block: int
    size: int

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.size / self.block

    @property
    def quantized(self) -> bool:
        return self.block > 1


# ggml.h's types that hold model weights (Q8_1 and Q8_K are dot-product intermediates, never stored)
GGML_TYPES = {
    t.id: t
    for t in [
        GGMLType(0, "F32", 1, 4),
        GGMLType(1, "F16", 1, 2),
        GGMLType(2, "Q4_0", 32, 18),
        GGMLType(3, "Q4_1", 32, 20),
        GGMLType(6, "Q5_0", 32, 22),
        GGMLType(7, "Q5_1", 32, 24),
        GGMLType(8, "Q8_0", 32, 34),
        GGMLType(10, "Q2_K", 256, 84),
        GGMLType(11, "Q3_K", 256, 110),
        GGMLType(12, "Q4_K", 256, 144),
        GGMLType(13, "Q5_K", 256, 176),
        GGMLType(14, "Q6_K", 256, 210),
        GGMLType(16, "IQ2_XXS", 256, 66),
        GGMLType(17, "IQ2_XS", 256, 74),
        GGMLType(18, "IQ3_XXS", 256, 98),
        GGMLType(19, "IQ1_S", 256, 50),
        GGMLType(20, "IQ4_NL", 32, 18),
        GGMLType(21, "IQ3_S", 256, 110),
        GGMLType(22, "IQ2_S", 256, 82),
        GGMLType(23, "IQ4_XS", 256, 136),
        GGMLType(24, "I8", 1, 1),
        GGMLType(25, "I16", 1, 2),
        GGMLType(26, "I32", 1, 4),
        GGMLType(27, "I64", 1, 8),
        GGMLType(28, "F64", 1, 8),
        GGMLType(29, "IQ1_M", 256, 56),
        GGMLType(30, "BF16", 1, 2),
        GGMLType(34, "TQ1_0", 256, 54),
        GGMLType(35, "TQ2_0", 256, 66),
        GGMLType(39, "MXFP4", 32, 17),
        GGMLType(40, "NVFP4", 64, 36),
    ]
}


@dataclass(frozen=True)
class GGUFTensor:
    """One entry of the tensor table: its GGUF name, dimensions as GGUF lists them (innermost
    first), type, and where its bytes lie in the file."""

    name: str
    dims: tuple[int, ...]
    type: GGMLType
    offset: int  # absolute, in the file
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """Row-major shape (outermost first), as torch and Hugging Face order it."""
        return tuple(reversed(self.dims))


class _Cursor:
    """Reads the header front to back, refusing any length that runs past the file."""

    def __init__(self, path: Path, f: Any, size: int):
        self.path, self.f, self.size = path, f, size
        self.position = 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.position + n > self.size:
            raise CorruptCheckpoint(f"GGUF header is truncated: {what} runs past the end of the file", self.path)
        data: bytes = self.f.read(n)
        if len(data) != n:
            raise CorruptCheckpoint(f"GGUF header is truncated: {what} runs past the end of the file", self.path)
        self.position += n
        return data

    def scalar(self, code: str, size: int, what: str) -> Any:
        return struct.unpack("<" + code, self.take(size, what))[0]

    def u32(self, what: str) -> int:
        value: int = self.scalar("I", 4, what)
        return value

    def u64(self, what: str) -> int:
        value: int = self.scalar("Q", 8, what)
        return value

    def string(self, what: str) -> str:
        length = self.u64(what)
        raw = self.take(length, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CorruptCheckpoint(f"GGUF {what} is not UTF-8", self.path) from None

    def value(self, kind: int, key: str, depth: int = 0) -> Any:
        if kind in SCALARS:
            return self.scalar(*SCALARS[kind], f"metadata {key!r}")
        if kind == STRING:
            return self.string(f"metadata {key!r}")
        if kind != ARRAY:
            raise CorruptCheckpoint(f"GGUF metadata {key!r} has unknown value type {kind}", self.path)
        if depth >= MAX_NESTING:
            raise CorruptCheckpoint(f"GGUF metadata {key!r} nests arrays more than {MAX_NESTING} deep", self.path)
        item, count = self.u32(f"metadata {key!r}"), self.u64(f"metadata {key!r}")
        if item in SCALARS:  # numbers at once: a million token scores in one read
            code, size = SCALARS[item]
            if count > (self.size - self.position) // size:
                raise CorruptCheckpoint(
                    f"GGUF metadata {key!r} claims {count} items, more than the file holds", self.path
                )
            return np.frombuffer(self.take(count * size, f"metadata {key!r}"), dtype="<" + code).tolist()
        if count > (self.size - self.position) // 8:  # a string or array item takes at least 8 bytes
            raise CorruptCheckpoint(f"GGUF metadata {key!r} claims {count} items, more than the file holds", self.path)
        return [self.value(item, key, depth + 1) for _ in range(count)]


class GGUFFile:
    """A validated GGUF file: `metadata` (key -> value) and `tensors` (GGUF name -> `GGUFTensor`)
    from the header alone; `read` fetches one tensor's raw bytes."""

    def __init__(self, path: Path):
        self.path = Path(path)
        fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise NotACheckpoint("not a regular file", self.path)
        self.size = info.st_size
        with os.fdopen(fd, "rb", buffering=1 << 20) as f:
            self.metadata, self.tensors, self.data_start = _read_header(_Cursor(self.path, f, self.size))

    def read(self, tensor: GGUFTensor, start: int = 0, nbytes: int | None = None) -> np.ndarray:
        """`nbytes` raw bytes of `tensor` from byte `start` of its data (all of it by default), read
        with positioned reads into a fresh uint8 array."""
        nbytes = tensor.nbytes - start if nbytes is None else nbytes
        raw: np.ndarray = np.empty(nbytes, dtype=np.uint8)
        view = memoryview(raw)  # type: ignore[arg-type]  # numpy arrays are buffers
        fd = os.open(self.path, os.O_RDONLY)
        try:
            done = 0
            while done < nbytes:
                n = os.preadv(fd, [view[done:]], tensor.offset + start + done)
                if n == 0:
                    raise CorruptCheckpoint("file is truncated", self.path, tensor.name)
                done += n
        finally:
            os.close(fd)
        return raw


def is_gguf(path: Path) -> bool:
    """Whether a file starts with GGUF's magic (what a file is, whatever its name)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def _read_header(cur: _Cursor) -> tuple[dict[str, Any], dict[str, GGUFTensor], int]:
    path = cur.path
    if cur.size < 4 or cur.take(4, "magic") != MAGIC:
        raise CorruptCheckpoint("not a GGUF file (no GGUF magic)", path)
    version = cur.u32("version")
    if version not in VERSIONS:
        if version >= 1 << 16 and struct.unpack(">I", struct.pack("<I", version))[0] in VERSIONS:
            raise CorruptCheckpoint("a big-endian GGUF file: only little-endian files are read", path)
        raise CorruptCheckpoint(f"GGUF version {version} is not supported (versions 2 and 3 are)", path)
    n_tensors, n_keys = cur.u64("tensor count"), cur.u64("metadata count")
    if n_tensors > cur.size // 24 or n_keys > cur.size // 12:  # the smallest entries take 24 and 12 bytes
        raise CorruptCheckpoint(
            f"GGUF header claims {n_tensors} tensors and {n_keys} metadata entries, more than the file holds", path
        )
    metadata: dict[str, Any] = {}
    for _ in range(n_keys):
        key = cur.string("metadata key")
        if key in metadata:
            raise CorruptCheckpoint(f"GGUF metadata key {key!r} appears twice", path)
        metadata[key] = cur.value(cur.u32(f"metadata {key!r}"), key)
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment < 1 or alignment & (alignment - 1):
        raise CorruptCheckpoint(f"GGUF general.alignment {alignment!r} is not a power of two", path)
    entries = []
    for _ in range(n_tensors):
        name = cur.string("tensor name")
        n_dims = cur.u32(f"tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise CorruptCheckpoint(f"has {n_dims} dimensions (1 to {MAX_DIMS} are possible)", path, name)
        dims = tuple(cur.u64(f"tensor {name!r}") for _ in range(n_dims))
        type_id, offset = cur.u32(f"tensor {name!r}"), cur.u64(f"tensor {name!r}")
        entries.append((name, dims, type_id, offset))
    data_start = -(-cur.position // alignment) * alignment
    data_size = cur.size - data_start
    tensors: dict[str, GGUFTensor] = {}
    for name, dims, type_id, offset in entries:
        if name in tensors:
            raise CorruptCheckpoint("tensor name appears twice in the GGUF tensor table", path, name)
        if type_id not in GGML_TYPES:
            raise UnsupportedDtype(f"GGML type {type_id} is not one weightlab reads", path, name)
        kind = GGML_TYPES[type_id]
        if any(d == 0 for d in dims) or any(d > 1 << 40 for d in dims):
            raise CorruptCheckpoint(f"has dimensions {list(dims)}", path, name)
        if dims[0] % kind.block:
            raise CorruptCheckpoint(
                f"rows of {dims[0]} values are not whole {kind.name} blocks of {kind.block}", path, name
            )
        nbytes = math.prod(dims) // kind.block * kind.size
        if offset % alignment:
            raise CorruptCheckpoint(f"data offset {offset} is not a multiple of the alignment {alignment}", path, name)
        if offset + nbytes > data_size:
            raise CorruptCheckpoint(
                f"{kind.name} {list(reversed(dims))} needs bytes {offset}..{offset + nbytes} of the data, "
                f"which holds {max(data_size, 0)}: the file is truncated or the shape is wrong",
                path,
                name,
            )
        tensors[name] = GGUFTensor(name, dims, kind, data_start + offset, nbytes)
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors.values() if t.nbytes)
    for (_, end, first), (begin, _, second) in itertools.pairwise(spans):
        if begin < end:
            raise CorruptCheckpoint(f"GGUF tensors {first!r} and {second!r} overlap", path, second)
    return metadata, tensors, data_start
