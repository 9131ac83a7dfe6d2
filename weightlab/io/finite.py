"""NaN and Inf never reach a file nor the maths: every writer calls `require_finite` on what it
writes, every reader `require_finite_input` on what it read."""

from __future__ import annotations

from pathlib import Path

import torch

from weightlab.errors import CorruptCheckpoint, NonFiniteTensor

CHUNK = 1 << 24


def all_finite(x: torch.Tensor) -> bool:
    """No NaN or Inf: NaN/Inf make the sum non-finite, so one cheap reduction answers, and the
    exact (memory-hungry) elementwise check runs only to confirm a suspicious sum."""
    if not (x.is_floating_point() or x.is_complex()) or x.numel() == 0:
        return True
    if x.element_size() == 1:  # float8 kinds have no sum: check float32 chunks of the flat tensor
        flat = x.reshape(-1)
        return all(bool(torch.isfinite(flat[i : i + CHUNK].float()).all()) for i in range(0, flat.numel(), CHUNK))
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


def require_finite(x: torch.Tensor, path: str | Path | None, name: str) -> torch.Tensor:
    """`x`, or NonFiniteTensor naming the output and the tensor."""
    if not all_finite(x):
        bad = int((~torch.isfinite(x)).sum())
        raise NonFiniteTensor(f"{bad} of {x.numel()} values are NaN or Inf; nothing was written", path, name)
    return x


def require_finite_input(x: torch.Tensor, path: str | Path | None, name: str) -> torch.Tensor:
    """`x`, or CorruptCheckpoint naming the input file and the tensor."""
    if not all_finite(x):
        raise CorruptCheckpoint("tensor has NaN or Inf values", path, name)
    return x
