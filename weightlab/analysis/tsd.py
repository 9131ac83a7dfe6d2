"""`weightlab tsd`: task-specific directions (TSD) of a fine-tune.

Si et al. 2024, "Task-Specific Directions: Definition, Exploration, and Utilization in Parameter
Efficient Fine-Tuning" (arXiv 2409.01035): with W = UΣVᵀ the base weight and ΔW the fine-tuning
update, the core directions are the base singular pairs (u_i, v_i); direction i changes at rate

    δ_i = |u_iᵀ ΔW v_i| / σ_i,

and the task-specific directions are the few with the largest δ_i. LoRA-Init (`init-lora --tsd`)
starts LoRA from them. For an adapter, ΔW v_i = s·B·(A v_i) is computed from the factors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from weightlab.compute.device import Compute
from weightlab.compute.directions import core_directions, delta_times_v
from weightlab.compute.svd import full_svd
from weightlab.compute.walk import Batch, Selection, TensorWalk
from weightlab.errors import CorruptCheckpoint
from weightlab.io.atomic import atomic_path
from weightlab.io.checkpoint import Checkpoint
from weightlab.io.safetensors_file import write_safetensors
from weightlab.options import TSDOptions
from weightlab.results import Result, Table


@dataclass
class MatrixTSD:
    name: str
    layer: int | None
    role: str
    shape: list[int]
    indices: list[int]  # the top-s directions by δ, 0-based positions in the base spectrum
    sigma: list[float]  # σ_i of those directions
    rate: list[float]  # δ_i of those directions
    percentile: list[float]  # 100·i/(r−1): 0 = the largest singular value, 100 = the smallest
    core_energy_share: float  # Σ_i (u_iᵀΔWv_i)² / ‖ΔW‖²_F over all core directions
    tsd_energy_share: float  # the same over the top-s directions only
    delta_norm: float  # ‖ΔW‖_F
    rates: list[float] = field(default_factory=list)  # δ_i for every i (or the first `keep`)


@dataclass
class TSDResult(Result):
    SCHEMA = "weightlab.tsd/1"
    TITLE = "Task-specific directions"
    REFERENCE = "Si et al. 2024, arXiv 2409.01035"
    ORDER = 40

    base: str
    finetuned: str
    options: TSDOptions
    matrices: list[MatrixTSD]
    problems: list[str] = field(default_factory=list)

    def percentile_histogram(self, bins: int = 10) -> list[int]:
        """How many TSDs sit in each tenth of the spectrum (first bin: the top singular values)."""
        values = [p for m in self.matrices for p in m.percentile]
        counts, _ = np.histogram(values, bins=bins, range=(0, 100))
        return counts.tolist()

    def median_percentile(self) -> float | None:
        return float(np.median([p for m in self.matrices for p in m.percentile])) if self.matrices else None

    def to_dict(self) -> dict:
        return {
            "schema": self.SCHEMA,
            "base": self.base,
            "finetuned": self.finetuned,
            "options": asdict(self.options),
            "problems": self.problems,
            "percentile_histogram": self.percentile_histogram(),
            "median_percentile": self.median_percentile(),
            "matrices": [asdict(m) for m in self.matrices],
        }

    def rows(self) -> list[dict]:
        return [
            {
                "name": m.name,
                "layer": m.layer,
                "role": m.role,
                "indices": m.indices,
                "rates": m.rate,
                "core_energy_share": m.core_energy_share,
                "tsd_energy_share": m.tsd_energy_share,
                "delta_norm": m.delta_norm,
            }
            for m in self.matrices
        ]

    def tables(self) -> list[Table]:
        return [
            Table(
                f"task-specific directions (top {self.options.top}), largest updates first",
                ["matrix", "layer", "role", "TSD indices", "top δ", "mean pct", "TSD share", "core share"],
                [
                    [
                        m.name,
                        m.layer,
                        m.role,
                        ", ".join(map(str, m.indices[:8])),
                        ", ".join(f"{r:.2g}" for r in m.rate[:3]),
                        sum(m.percentile) / len(m.percentile) if m.percentile else None,
                        m.tsd_energy_share,
                        m.core_energy_share,
                    ]
                    for m in sorted(self.matrices, key=lambda m: -m.delta_norm)
                ],
                "pct: position in the spectrum (0 = largest σ); shares of ‖ΔW‖²_F on the TSDs / all core directions",
                names=True,
            )
        ]

    def lines(self) -> list[str]:
        return [
            "TSD positions by spectrum decile (top σ first): " + " ".join(str(c) for c in self.percentile_histogram())
        ]

    def headline(self) -> list[tuple[str, str, object]]:
        return [
            ("tsd.matrices", "matrices", len(self.matrices)),
            ("tsd.median_percentile", "median TSD position (percentile, 0 = top σ)", self.median_percentile()),
        ]


def tsd(
    base: Checkpoint,
    finetuned: Checkpoint,
    options: TSDOptions = TSDOptions(),
    compute: Compute | None = None,
    on_progress: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    keep_vectors: bool = False,
) -> tuple[TSDResult, dict[str, dict[str, torch.Tensor]]]:
    """Top-`options.top` task-specific directions of every matched matrix.

    Returns the result and, with `keep_vectors`, per matrix the tensors `--save` stores
    (indices, u, v, sigma, rate), for LoRA-Init.
    """
    compute = compute or Compute.create()
    walk = TensorWalk([base, finetuned], Selection.of(options), changed_by=[finetuned])

    def work(batch: Batch, compute: Compute) -> list[tuple[MatrixTSD, dict[str, torch.Tensor] | None]]:
        w, w_ft = batch.tensors
        svd = full_svd(w)
        out = []
        for b, item in enumerate(batch.items):
            name = item.names[0]
            u, s, vh = svd.U[b], svd.S[b], svd.Vh[b]
            delta_v, delta_norm2 = delta_times_v(finetuned, name, w[b], None if w_ft is None else w_ft[b], vh, compute)
            rates, order, core, chosen = core_directions(u, s, delta_v, delta_norm2, min(options.top, s.numel()))
            r = s.numel()
            idx = order.tolist()
            matrix = MatrixTSD(
                name,
                item.layer,
                item.role,
                [u.shape[0], vh.shape[1]],
                idx,
                s[order].tolist(),
                rates[order].tolist(),
                [100.0 * i / max(r - 1, 1) for i in idx],
                core,
                chosen,
                delta_norm2**0.5,
                rates[: options.keep].tolist(),
            )
            kept = (
                {
                    "indices": order.cpu(),
                    "u": u[:, order].cpu().contiguous(),
                    "v": vh[order].T.cpu().contiguous(),
                    "sigma": s[order].cpu(),
                    "rate": rates[order].cpu(),
                }
                if keep_vectors
                else None
            )
            out.append((matrix, kept))
        return out

    pieces = walk.map(work, compute, factors=True, on_start=on_start, on_progress=on_progress)
    matrices = [m for m, _ in pieces]
    vectors = {m.name: kept for m, kept in pieces if kept is not None}
    matrices = walk.in_order(matrices, lambda m: m.name)
    vectors = {m.name: vectors[m.name] for m in matrices if m.name in vectors}
    result = TSDResult(str(base.path), str(finetuned.path), options, matrices, walk.problems)
    return result, vectors


def save_directions(
    path: str | Path, vectors: dict[str, dict[str, torch.Tensor]], metadata: dict[str, str], force: bool = False
) -> None:
    """Store per matrix `NAME::indices|u|v|sigma|rate` in one safetensors file (atomically)."""
    flat = {f"{name}::{key}": t for name, parts in vectors.items() for key, t in parts.items()}
    with atomic_path(path, force) as tmp:
        write_safetensors(tmp, flat, {"schema": TSDResult.SCHEMA, **metadata})


def load_directions(path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """Read what `save_directions` wrote: {matrix name: {indices, u, v, sigma, rate}}."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        flat = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CorruptCheckpoint(f"not a TSD file ({e})", path) from None
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in flat.items():
        name, _, part = key.rpartition("::")
        out.setdefault(name, {})[part] = tensor
    return out


def representative(matrices: Sequence[MatrixTSD], count: int = 4) -> list[MatrixTSD]:
    """Matrices spread over depth (first, middle, last layers) with the largest update each."""
    by_layer: dict[object, MatrixTSD] = {}
    for m in matrices:
        if m.rates and (m.layer not in by_layer or m.delta_norm > by_layer[m.layer].delta_norm):
            by_layer[m.layer] = m
    chosen = [by_layer[k] for k in sorted(by_layer, key=lambda k: (k is None, k if k is not None else 0))]
    if len(chosen) <= count:
        return chosen
    picks = np.linspace(0, len(chosen) - 1, count).round().astype(int)
    return [chosen[i] for i in picks]
