"""Dot products between whole tensors, in float64 without a float64 copy of them all."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from weightlab.errors import InvalidArgument
from weightlab.io.checkpoint import Checkpoint
from weightlab.io.experts import MoEBlock

STEP_ENTRIES = 1 << 23  # entries of all tensors together per step (64 MiB in float64)


def cross_dots(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor] | None = None) -> np.ndarray:
    """⟨x_i, y_j⟩ of the flattened tensors (`ys` defaults to `xs`: their Gram matrix), summed in
    float64 over chunks of entries, `STEP_ENTRIES` of all the tensors together at a time (128
    experts of a 30B-A3B block: 64 Ki entries each per step)."""
    flat_x = [x.reshape(-1) for x in xs]
    flat_y = flat_x if ys is None else [y.reshape(-1) for y in ys]
    if any(f.numel() != flat_x[0].numel() for f in [*flat_x, *flat_y]):
        raise ValueError("cross_dots: the tensors differ in size")
    total = np.zeros((len(flat_x), len(flat_y)))
    chunk = max(4096, STEP_ENTRIES // (len(flat_x) + (0 if ys is None else len(flat_y))))
    for start in range(0, flat_x[0].numel(), chunk):
        x = torch.stack([f[start : start + chunk].double() for f in flat_x])
        y = x if ys is None else torch.stack([f[start : start + chunk].double() for f in flat_y])
        total += (x @ y.T).cpu().numpy()
    return total


def squared_norms(xs: Sequence[torch.Tensor]) -> np.ndarray:
    """‖x_i‖² in float64."""
    out: np.ndarray = np.array([float(x.double().square().sum()) for x in xs])
    return out


def cosines(dots: np.ndarray, a_sq: np.ndarray, b_sq: np.ndarray) -> np.ndarray:
    """cos from dot products and squared norms; 0 where a norm is 0."""
    scale = np.outer(np.sqrt(a_sq), np.sqrt(b_sq))
    out: np.ndarray = np.divide(dots, scale, out=np.zeros_like(dots), where=scale > 0)
    return out


def expert_cosines(
    a: Checkpoint, a_block: MoEBlock, b: Checkpoint | None = None, b_block: MoEBlock | None = None
) -> np.ndarray:
    """cos(θ_e, θ'_f) of whole experts (every part in one vector) for every pair: between the
    experts of one MoE block of `a`, or against those of `b`'s matching block. Each part of each
    expert is read once, as stored; the sums are float64 (`cross_dots`)."""
    n = a_block.experts
    dots, a_sq, b_sq = np.zeros((n, n)), np.zeros(n), np.zeros(n)
    for part, by_expert in a_block.parts.items():
        xs = [a.get(by_expert[e]) for e in range(n)]
        if b is None or b_block is None:
            dots += cross_dots(xs)
            a_sq += squared_norms(xs)
            continue
        ys = [b.get(b_block.parts[part][e]) for e in range(n)]
        if xs[0].shape != ys[0].shape:
            raise InvalidArgument(
                f"the experts' {part} differ in shape ({list(xs[0].shape)} and {list(ys[0].shape)})", b.path
            )
        dots += cross_dots(xs, ys)
        a_sq += squared_norms(xs)
        b_sq += squared_norms(ys)
    return cosines(dots, a_sq, a_sq if b is None else b_sq)
