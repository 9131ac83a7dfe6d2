"""One `.safetensors` file: validated header, and reads of exactly one tensor's bytes.

Format: 8-byte little-endian header length N, N bytes of JSON
(`{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}`), then the data.
We parse the header ourselves to give precise errors, and read each tensor with one `pread`
into a fresh buffer: no memory map, so nothing but the tensor asked for is ever resident.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from weightlab.errors import CorruptCheckpoint, UnsupportedDtype
from weightlab.io.finite import require_finite
from weightlab.io.safetensors_header import MAX_HEADER_BYTES, parse_header, validate_layout

# safetensors dtype code -> (torch dtype name, bytes per element)
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "U16": ("uint16", 2),
    "U32": ("uint32", 4),
    "U64": ("uint64", 8),
    "BOOL": ("bool", 1),
    "C64": ("complex64", 8),
    "F8_E8M0": ("float8_e8m0fnu", 1),
    "F8_E4M3FNUZ": ("float8_e4m3fnuz", 1),
    "F8_E5M2FNUZ": ("float8_e5m2fnuz", 1),
}  # F4 and F6 pack several values per byte: listed, but not read
CODE_OF_TORCH_DTYPE = {getattr(torch, name): code for code, (name, _) in DTYPES.items() if hasattr(torch, name)}


@dataclass(frozen=True)
class StoredAs:
    """How a quantized tensor is stored: its format (e.g. GGUF's "Q4_K", "GPTQ int4 g128"), what it
    costs in bits per weight (scales and zero points included), and its bytes in the file."""

    format: str
    bits_per_weight: float
    nbytes: int


@dataclass(frozen=True)
class TensorInfo:
    """What a header says of one tensor; listing never reads more than this. A quantized tensor
    reads as `dtype` (its decoded values) and says how it is stored in `stored`."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors code of what a read returns, e.g. "BF16"
    file: Path
    offset: int  # absolute byte offset of the data in `file`
    nbytes: int  # bytes of what a read returns
    stored: StoredAs | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_float(self) -> bool:
        return self.dtype.startswith(("F", "BF")) and self.dtype in DTYPES


def torch_dtype(code: str, path: Path | str, tensor: str) -> torch.dtype:
    if code not in DTYPES or not hasattr(torch, DTYPES[code][0]):
        raise UnsupportedDtype(f"dtype {code} is not supported", path, tensor)
    dtype: torch.dtype = getattr(torch, DTYPES[code][0])
    return dtype


class SafetensorsFile:
    """A validated safetensors file. `infos` comes from the header alone."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.infos, self.metadata = _read_header(self.path)

    def read(
        self, info: TensorInfo, rows: tuple[int, int] | None = None, into: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Read one tensor (CPU, stored dtype) with a single positioned read of its bytes; with
        `rows` = (start, stop), only those rows of its first dimension; into `into` (a uint8
        buffer of at least its bytes, kept by the caller) when given, else a fresh tensor."""
        dtype = torch_dtype(info.dtype, self.path, info.name)
        shape, offset, nbytes = info.shape, info.offset, info.nbytes
        if rows is not None:
            row_bytes = nbytes // shape[0]
            shape = (rows[1] - rows[0], *shape[1:])
            offset, nbytes = offset + rows[0] * row_bytes, (rows[1] - rows[0]) * row_bytes
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        # uninitialised: no page is touched twice
        fits = into is not None and into.dtype == torch.uint8 and into.numel() >= nbytes
        raw = into.view(-1)[:nbytes] if into is not None and fits else torch.empty(nbytes, dtype=torch.uint8)
        view = memoryview(raw.numpy())  # type: ignore[arg-type]  # numpy arrays are buffers
        fd = os.open(self.path, os.O_RDONLY)
        try:
            done = 0
            while done < nbytes:  # pread may return short reads for very large tensors
                n = os.preadv(fd, [view[done:]], offset + done)
                if n == 0:
                    raise CorruptCheckpoint("file is truncated", self.path, info.name)
                done += n
        finally:
            os.close(fd)
        return raw.view(dtype).reshape(shape)


def _read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CorruptCheckpoint("file is shorter than a safetensors header", path)
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER_BYTES:
            raise CorruptCheckpoint(f"header length {length} exceeds the {MAX_HEADER_BYTES}-byte limit", path)
        if 8 + length > size:
            raise CorruptCheckpoint(f"header length {length} is larger than the file ({size} bytes)", path)
        raw = f.read(length)
    entries, metadata = parse_header(raw, path)
    validate_layout(entries, size - 8 - length, path)
    data_start = 8 + length
    infos = {
        name: TensorInfo(name, shape, code, path, data_start + begin, end - begin)
        for name, (code, shape, begin, end) in entries.items()
    }
    return infos, metadata


def safetensors_header(
    specs: list[tuple[str, tuple[int, ...], torch.dtype]], metadata: dict[str, str] | None, path: str | Path = ""
) -> tuple[bytes, dict[str, int]]:
    """The 8-byte length and JSON header for tensors `(name, shape, dtype)`, names sorted, data
    8-byte aligned; and each tensor's absolute byte offset in the file."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    offset, offsets = 0, {}
    for name, shape, dtype in sorted(specs):
        if dtype not in CODE_OF_TORCH_DTYPE:
            raise UnsupportedDtype(f"dtype {dtype} cannot be written to safetensors", path, name)
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {
            "dtype": CODE_OF_TORCH_DTYPE[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offsets[name] = offset
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    start = 8 + len(raw)
    return struct.pack("<Q", len(raw)) + raw, {name: start + o for name, o in offsets.items()}


def tensor_bytes(t: torch.Tensor, path: str | Path | None, name: str) -> memoryview:
    """A tensor's little-endian bytes without a copy (after moving it to the CPU, contiguous).
    Every writer goes through here, so a NaN or Inf never reaches a file (`require_finite`)."""
    flat = require_finite(t.detach(), path, name).to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")  # type: ignore[arg-type]


def write_safetensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Write a safetensors file with sorted names and sorted metadata: same tensors, same bytes.

    (The reference writer keeps metadata in a hash map, whose order varies from run to run.)
    """
    header, _ = safetensors_header([(n, tuple(t.shape), t.dtype) for n, t in tensors.items()], metadata, path)
    data = [tensor_bytes(tensors[name], path, name) for name in sorted(tensors)]  # all checked before a byte is written
    with open(path, "wb") as f:
        f.write(header)
        for chunk in data:
            f.write(chunk)
