"""TIES-Merging's arithmetic as fused CPU kernels (numba): each step reads a block once, where the
torch formulas (`compute.trim`, `merging.methods.elect_and_mean`) make some thirty elementwise
passes and hold a whole |τ| per model. The same thresholds and the same bits as those formulas
(tests/test_ties_kernels.py); a GPU or float64 maths takes the formulas.

The k-th largest |τ| by counting, a two-level radix selection: a non-negative float32 orders as
its bit pattern, so the counts of the top 16 bits of every |τ_i| name the bin that holds the
k-th largest, and the counts of the low 16 bits inside it, the value itself (`Counts`;
`merging.ties.counted_trims` counts the low bits of a window of bins guessed from the first
block in the same pass as what lies above it). Nothing of the whole tensor is kept but counts."""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
import torch
from numba import prange, types
from numba.extending import intrinsic, overload

BINS = 1 << 16  # 16 bits of a float32 at a time


@intrinsic
def _bits(typingctx, x):  # type: ignore[no-untyped-def]
    """A float32's bit pattern as a uint32 (a free reinterpretation)."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], context.get_value_type(types.uint32))

    return types.uint32(types.float32), codegen


@intrinsic
def _from_bits(typingctx, x):  # type: ignore[no-untyped-def]
    """The float32 of a bit pattern."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], context.get_value_type(types.float32))

    return types.float32(types.uint32), codegen


@intrinsic
def _fma(typingctx, a, b, c):  # type: ignore[no-untyped-def]
    """a·b + c rounded once, as torch's `add_(x, alpha=c)` computes it on the CPU."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.fma(*args)

    return types.float32(types.float32, types.float32, types.float32), codegen


def _f32(x: Any) -> float:
    """An entry as float32: a bfloat16 (its bits, as uint16) is the top half of one, exactly.
    Compiled in the kernels only (`_f32_of`)."""
    raise NotImplementedError


@overload(_f32, inline="always")
def _f32_of(x):  # type: ignore[no-untyped-def]
    if x == types.uint16:
        return lambda x: _from_bits(np.uint32(x) << 16)
    if x == types.float32:
        return lambda x: x
    return None


@numba.njit(parallel=True, cache=True, nogil=True)
def _count_high(base, models, high):  # type: ignore[no-untyped-def]
    """high[c, i, h] += how many |τ_i| of the c-th share of the block have top 16 bits h."""
    n, shares = base.size, high.shape[0]
    step = (n + shares - 1) // shares
    for c in prange(shares):
        for j in range(c * step, min(n, (c + 1) * step)):
            b = base[j]
            for i in range(len(models)):
                high[c, i, _bits(abs(_f32(models[i][j]) - b)) >> 16] += 1


@numba.njit(parallel=True, cache=True, nogil=True)
def _count_window(base, models, lowest, above, window):  # type: ignore[no-untyped-def]
    """For the c-th share of the block: above[c, i] += how many |τ_i| have top bits above the
    window lowest[i] .. lowest[i] + width − 1; window[c, i, w, l] += how many have top bits
    lowest[i] + w and low bits l. The window holds few entries (one in ten for a 7B model's
    bfloat16 weights, whose |τ| near the threshold takes few distinct values)."""
    n, shares, width = base.size, above.shape[0], window.shape[2]
    step = (n + shares - 1) // shares
    for c in prange(shares):
        more: np.ndarray = np.zeros(len(models), np.int64)
        for j in range(c * step, min(n, (c + 1) * step)):
            b = base[j]
            for i in range(len(models)):
                bits = _bits(abs(_f32(models[i][j]) - b))
                w = np.int64(bits >> 16) - lowest[i]
                more[i] += w >= width
                if 0 <= w < width:
                    window[c, i, w, bits & 0xFFFF] += 1
        above[c] += more


@numba.njit(cache=True, nogil=True)
def _nth_equal(base, model, threshold, nth):  # type: ignore[no-untyped-def]
    """(one past the index of the nth entry with |τ| = threshold, nth) if the block has that
    many, else (its size, how many it has): counted a chunk at a time (a loop without
    branches), the chunk that holds the nth scanned entry by entry."""
    n, chunk, seen = base.size, 4096, 0
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        here = 0
        for j in range(start, stop):
            here += abs(_f32(model[j]) - base[j]) == threshold
        if seen + here >= nth:
            for j in range(start, stop):
                if abs(_f32(model[j]) - base[j]) == threshold:
                    seen += 1
                    if seen == nth:
                        return j + 1, seen
        seen += here
    return n, seen


@numba.njit(parallel=True, cache=True, nogil=True)
def _merge(base, models, coeffs, thresholds, cutoffs, lam, out, normalize):  # type: ignore[no-untyped-def]
    """out = θ_b + λ·(disjoint mean of the trimmed τ_i that agree with the elected sign; their sum
    without `normalize`), in chunks that stay in cache: trim (|τ| > t, or = t before the cutoff)
    and elect, then mean."""
    n, chunk, zero = base.size, 4096, np.float32(0)
    for c in prange((n + chunk - 1) // chunk):
        start = c * chunk
        size = min(n, start + chunk) - start
        taus, elected = np.empty((len(models), size), np.float32), np.zeros(size, np.float32)
        for i in range(len(models)):
            model, t, cut, coeff, trimmed = models[i], thresholds[i], cutoffs[i] - start, coeffs[i], taus[i]
            for k in range(size):
                tau = _f32(model[start + k]) - base[start + k]
                tau = tau if (abs(tau) > t) | ((abs(tau) == t) & (k < cut)) else zero
                trimmed[k] = tau
                elected[k] = _fma(coeff, tau, elected[k])
        total, weight = np.zeros(size, np.float32), np.zeros(size, np.float32)
        for i in range(len(models)):
            coeff, trimmed = coeffs[i], taus[i]
            for k in range(size):
                tau = trimmed[k]
                agrees = ((tau > zero) & (elected[k] >= zero)) | ((tau < zero) & (elected[k] < zero))  # 0 elects +
                total[k] = _fma(coeff, tau, total[k]) if agrees else total[k]
                weight[k] = weight[k] + coeff if agrees else weight[k]
        for k in range(size):
            mean = total[k] if not normalize else total[k] / weight[k] if weight[k] > zero else zero  # none agreed: 0
            out[start + k] = mean * lam + base[start + k]


MODEL_DTYPES = (torch.float32, torch.bfloat16)  # models as read (`stored_models`): bfloat16 is decoded in the kernels


def runs_on(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether maths on this device in this dtype go through the kernels: float32 on the CPU."""
    return device.type == "cpu" and dtype == torch.float32


def fits(base: torch.Tensor, models: list[torch.Tensor]) -> bool:
    """Whether a block goes through the kernels: the base as `runs_on` says, the models all in
    one of MODEL_DTYPES on the CPU."""
    return (
        runs_on(base.device, base.dtype)
        and all(m.device.type == "cpu" and m.dtype == models[0].dtype for m in models)
        and models[0].dtype in MODEL_DTYPES
    )


def _flat(x: torch.Tensor) -> np.ndarray:
    flat = x.reshape(-1).contiguous()
    return flat.view(torch.int16).numpy().view(np.uint16) if flat.dtype == torch.bfloat16 else flat.numpy()


def _models(models: list[torch.Tensor]) -> tuple[np.ndarray, ...]:
    return tuple(_flat(m) for m in models)


def _threads() -> None:
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


class Counts:
    """Counts of |τ_i| over the blocks of one tensor, in arrays per thread (summed when read): of
    the top 16 bits (`add_high`), or of the entries above a window of `width` top-bit bins per
    model and of the low 16 bits inside it (`add_window`)."""

    def __init__(self, models: int, width: int):
        _threads()
        shares = numba.get_num_threads()
        self._high: np.ndarray = np.zeros((shares, models, BINS), np.int64)
        self._above: np.ndarray = np.zeros((shares, models), np.int64)
        self._window: np.ndarray = np.zeros((shares, models, width, BINS), np.int64)

    def add_high(self, base: torch.Tensor, models: list[torch.Tensor]) -> None:
        _threads()
        _count_high(_flat(base), _models(models), self._high)

    def add_window(self, base: torch.Tensor, models: list[torch.Tensor], lowest: np.ndarray) -> None:
        _threads()
        _count_window(_flat(base), _models(models), lowest.astype(np.int64), self._above, self._window)

    def high(self) -> np.ndarray:
        """(models, 2^16): how many |τ_i| have each top 16 bits."""
        summed: np.ndarray = self._high.sum(0)
        return summed

    def above(self) -> np.ndarray:
        """(models,): how many |τ_i| lie above the window."""
        summed: np.ndarray = self._above.sum(0)
        return summed

    def window(self) -> np.ndarray:
        """(models, width · 2^16): how many |τ_i| have each 32 bits in the window, ascending."""
        summed: np.ndarray = self._window.sum(0)
        return summed.reshape(summed.shape[0], -1)


def nth_equal(base: torch.Tensor, model: torch.Tensor, threshold: float, nth: int) -> tuple[int, int]:
    """(one past the flat index of the nth entry of a block with |θ − θ_b| = threshold, nth), or
    (the block's size, how many it has) when it has fewer."""
    end, seen = _nth_equal(_flat(base), _flat(model), np.float32(threshold), nth)
    return int(end), int(seen)


def merge_block(
    base: torch.Tensor,
    models: list[torch.Tensor],
    coeffs: np.ndarray,
    thresholds: np.ndarray,
    cutoffs: np.ndarray,
    lam: float,
    out: torch.Tensor,
    normalize: bool = True,
) -> torch.Tensor:
    """TIES on a block (`_merge`) into `out` (float32, the block's shape): entries with
    |τ_i| = thresholds[i] are kept below flat index cutoffs[i] only."""
    _threads()
    _merge(
        _flat(base),
        _models(models),
        coeffs.astype(np.float32),
        thresholds.astype(np.float32),
        cutoffs.astype(np.int64),
        np.float32(lam),
        out.view(-1).numpy(),
        bool(normalize),
    )
    return out
