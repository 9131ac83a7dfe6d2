"""Integers packed into 32-bit words, lowest bits first (GPTQ, AWQ, compressed-tensors, MLX all
pack this way; AWQ then permutes within a word)."""

from __future__ import annotations

import torch


def unpack(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The `32/bits` unsigned values of each 32-bit word of `words` (int32 or uint32 as stored),
    laid out along `dim` (value k of a word at position 32/bits·i + k), as int32."""
    per = 32 // bits
    as_int = words.view(torch.int32) if words.dtype in (torch.uint32, torch.int32) else words.to(torch.int32)
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    moved = as_int.movedim(dim, -1)
    values = (moved.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return values.reshape(*moved.shape[:-1], moved.shape[-1] * per).movedim(-1, dim)


def unpack_unsigned(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Unsigned b-bit values packed densely along each row of 32-bit `words` (value i at bit i·b
    of the row, a value may straddle two words: MLX and compressed-tensors at 3, 5, 6 or 7
    bits), the first `count` of each row, as int32."""
    w = words.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    start = torch.arange(count, dtype=torch.int64) * bits
    word, offset = start // 32, start % 32
    low = w[:, word] >> offset
    spill = (offset + bits > 32) & (word + 1 < w.shape[1])
    high = torch.where(spill, w[:, (word + 1).clamp(max=w.shape[1] - 1)] << (32 - offset), torch.zeros_like(low))
    return ((low | high) & ((1 << bits) - 1)).to(torch.int32)
