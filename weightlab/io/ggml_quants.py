"""GGML's block quantizations decoded to float32: the common ones in torch here, the rarer
ones through the `gguf` package (llama.cpp's own Python reader), bit for bit the same values.

Each kernel mirrors ggml-quants.c's `dequantize_row_*` (and gguf-py's `quants.py`, which does the
same in numpy) operation for operation in float32, so the results are identical, not close:
tests/test_gguf.py compares every type with gguf's dequantizer to exact equality. A block of
`block` values is stored in `size` bytes; values are scale·q (− min) per block or sub-block.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from weightlab.errors import UnsupportedDtype
from weightlab.io.gguf_file import GGMLType

QK_K = 256  # values per K-quant super-block
CHUNK_VALUES = 1 << 22  # decoded a chunk at a time: temporaries stay a few tens of MB

Kernel = Callable[[torch.Tensor], torch.Tensor]  # (n_blocks, size) uint8 -> (n_blocks, block) float32


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The float16 at bytes [start, start+2) of each block, as float32, shape (n, 1)."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor, groups: int) -> torch.Tensor:
    """Bytes (n, groups·w) → values (n, groups, 2, w): each group's low nibbles, then its high ones."""
    n = qs.shape[0]
    q = qs.reshape(n, groups, 1, -1)
    return torch.cat([q & 0x0F, q >> 4], dim=2)


def _bits(data: torch.Tensor, shifts: list[int], mask: int) -> torch.Tensor:
    """(n, g, w) bytes → (n, g, len(shifts), w): (byte >> s) & mask for each shift."""
    return torch.stack([(data >> s) & mask for s in shifts], dim=2)


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b, 0)
    q = _nibbles(b[:, 2:], 1).reshape(b.shape[0], 32).to(torch.int8) - 8
    return d * q.float()


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b, 0), _f16(b, 2)
    q = _nibbles(b[:, 4:], 1).reshape(b.shape[0], 32).float()
    return d * q + m


def _fifth_bits(qh: torch.Tensor) -> torch.Tensor:
    """Q5_0/Q5_1: bit j of the little-endian u32 `qh` is the 5th bit of value j; (n, 32)."""
    return _bits(qh.reshape(qh.shape[0], 4, 1), list(range(8)), 1).reshape(qh.shape[0], 32)


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b, 0)
    low = _nibbles(b[:, 6:], 1).reshape(b.shape[0], 32)
    q = (low | (_fifth_bits(b[:, 2:6]) << 4)).to(torch.int8) - 16
    return d * q.float()


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b, 0), _f16(b, 2)
    low = _nibbles(b[:, 8:], 1).reshape(b.shape[0], 32)
    q = (low | (_fifth_bits(b[:, 4:8]) << 4)).float()
    return d * q + m


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b, 0)


def _q2_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    d, dmin = _f16(b, 80), _f16(b, 82)
    dl = (d * (scales & 0x0F).float()).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).reshape(n, 16, 1)
    q = _bits(qs.reshape(n, 2, 32), [0, 2, 4, 6], 3).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    hmask, qs, packed = b[:, :32], b[:, 32:96], b[:, 96:108]
    d = _f16(b, 108)
    low = _bits(packed[:, :8].reshape(n, 1, 8), [0, 4], 0x0F).reshape(n, 16)
    high = _bits(packed[:, 8:].reshape(n, 1, 4), [0, 2, 4, 6], 0x03).reshape(n, 16)
    scales = ((low | (high << 4)).to(torch.int8) - 32).float()
    dl = (d * scales).reshape(n, 16, 1)
    ql = _bits(qs.reshape(n, 2, 32), [0, 2, 4, 6], 3).reshape(n, 16, 16)
    qh = _bits(hmask.reshape(n, 1, 32), list(range(8)), 1).reshape(n, 16, 16) ^ 1  # set bit: no offset
    q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).float()
    return (dl * q).reshape(n, QK_K)


def _scale_min_k4(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: eight 6-bit scales and eight 6-bit mins packed in 12 bytes (ggml's get_scale_min_k4)."""
    n = packed.shape[0]
    p = packed.reshape(n, 3, 4)
    d, m, md = p[:, 0], p[:, 1], p[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc, mn


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _scale_min_k4(b[:, 4:16])
    scale = (d * sc.float()).reshape(n, 8, 1)
    offset = (dmin * mn.float()).reshape(n, 8, 1)
    q = _nibbles(b[:, 16:], 4).reshape(n, 8, 32).float()
    return (scale * q - offset).reshape(n, QK_K)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _scale_min_k4(b[:, 4:16])
    scale = (d * sc.float()).reshape(n, 8, 1)
    offset = (dmin * mn.float()).reshape(n, 8, 1)
    low = _nibbles(b[:, 48:], 4).reshape(n, 8, 32)
    high = _bits(b[:, 16:48].reshape(n, 1, 32), list(range(8)), 1).reshape(n, 8, 32)
    q = (low | (high << 4)).float()
    return (scale * q - offset).reshape(n, QK_K)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql, qh, scales = b[:, :128], b[:, 128:192], b[:, 192:208]
    d = _f16(b, 208)
    scale = (d * scales.contiguous().view(torch.int8).float()).reshape(n, 16, 1)
    low = _nibbles(ql, 2).reshape(n, 8, 32)
    high = _bits(qh.reshape(n, 2, 32), [0, 2, 4, 6], 3).reshape(n, 8, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, 16, 16).float()
    return (scale * q).reshape(n, QK_K)


KERNELS: dict[str, Kernel] = {
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "Q8_0": _q8_0,
    "Q2_K": _q2_k,
    "Q3_K": _q3_k,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
}
PLAIN = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
INTEGERS = {"I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64}


def read_dtype(kind: GGMLType) -> torch.dtype:
    """What a tensor of this type reads as: its own dtype when unquantized, else float32."""
    return PLAIN.get(kind.name) or INTEGERS.get(kind.name) or torch.float32


def decode(raw: np.ndarray, kind: GGMLType, path: object = None, tensor: str | None = None) -> torch.Tensor:
    """The values (1-D, `read_dtype(kind)`) of a whole number of `kind` blocks in `raw` (uint8)."""
    if kind.name in PLAIN or kind.name in INTEGERS:
        return torch.from_numpy(raw).view(read_dtype(kind))
    blocks = torch.from_numpy(raw).reshape(-1, kind.size)
    out = torch.empty(blocks.shape[0] * kind.block, dtype=torch.float32)
    step = max(1, CHUNK_VALUES // kind.block)
    kernel = KERNELS.get(kind.name) or _through_gguf(kind, path, tensor)
    for i in range(0, blocks.shape[0], step):
        part = blocks[i : i + step]
        out[i * kind.block : (i + part.shape[0]) * kind.block] = kernel(part).reshape(-1)
    return out


def _through_gguf(kind: GGMLType, path: object, tensor: str | None) -> Kernel:
    """gguf-py's numpy dequantizer for the types without a kernel here (the IQ, TQ and FP4 types)."""
    try:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize
    except ImportError:
        raise UnsupportedDtype(
            f'{kind.name} tensors are decoded by llama.cpp\'s gguf package: pip install gguf (or "weightlab[gguf]")',
            None if path is None else str(path),
            tensor,
        ) from None
    try:
        qtype = GGMLQuantizationType(kind.id)
    except ValueError:
        raise UnsupportedDtype(f"the installed gguf package does not know {kind.name}", str(path), tensor) from None

    def kernel(blocks: torch.Tensor) -> torch.Tensor:
        with np.errstate(all="ignore"):  # non-finite values are refused by whoever uses them, by name
            values = dequantize(blocks.numpy(), qtype)
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))

    return kernel
