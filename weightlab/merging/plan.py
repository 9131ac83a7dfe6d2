"""`merge --dry-run`: what a merge would read, write and hold in memory, from the headers alone.

Peak memory of the streaming executor (docs/merge.md, "Memory and speed"), with N inputs (the
models, and the base when there is one) and T the largest tensor merged whole, in the maths'
dtype (float32, or float64 for the SVD and covariance methods):

  peak ≈ P + R + (N + 2)·T + W·T

P is the process itself (Python, torch: about 0.4 GB), R the read-ahead cap (256 MB in flight),
(N + 2)·T one tensor of each input plus the output and one work buffer, and W·T the method's own
workspace (0 for elementwise methods, 4 for the per-matrix SVD and covariance methods: an SVD's
factors and their products). Tensors merged a block of rows at a time cost (2N + 2) blocks of
16 MB as stored instead (this block and the next), what the method keeps in reused buffers
(`row_workspace`), what its statistics keep of the whole (`statistics_bytes`) and, for a method
with statistics, the largest split tensor whose inputs fit 512 MB, kept as read for the passes
after the first (`_merge_in_rows`).
Data-aware methods add the model run in float32 and up to 1 GiB of Gram matrices.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from weightlab.compute import ties_kernels
from weightlab.compute.activations import GRAM_BUDGET
from weightlab.compute.device import Compute
from weightlab.compute.rows import KEPT_TENSOR_BYTES, ROW_BLOCK_BYTES
from weightlab.compute.stream import READ_AHEAD_BYTES
from weightlab.compute.ties_kernels import BINS
from weightlab.display import human_bytes, model_names
from weightlab.io.atomic import free_bytes
from weightlab.io.checkpoint import Checkpoint
from weightlab.io.writer import DEFAULT_SHARD_SIZE, parse_size, stored_plan
from weightlab.merging.config import MergeConfig
from weightlab.merging.run import in_row_blocks, open_inputs
from weightlab.results import Result, Table

PROCESS_BYTES = 400 << 20  # Python, torch and weightlab, before any tensor
WORKSPACE = {"subspace": 4, "covariance": 4}  # extra whole tensors the per-matrix methods hold
ELEMENTWISE_TEMPORARIES = 1


def row_workspace(method: str, models: int, kernels: bool) -> int:
    """Blocks (float32) a method holds while merging in row blocks: TIES's merged block in its
    CPU kernels (`compute.ties_kernels`), else its trimmed τ̂_i in reused buffers
    (`compute.scratch`) and the vote (sign, sum, divisor, two work blocks); Iso-CTS's merged
    block and its cast (its float64 maths goes 512 rows at a time)."""
    if method == "ties":
        return 1 if kernels else models + 5
    return 2 if method == "iso-cts" else 0


def statistics_bytes(method: str, shape: tuple[int, ...], models: int, kernels: bool = False) -> int:
    """What a statistics pass keeps of a tensor merged in row blocks (`MergeMethod.statistics`):
    TIES in its CPU kernels: counts of 2^16 bins (int64) per model and block of 16 MB (from a
    float32 tensor: the most blocks); else |τ| in float32 and two masks of the selection, 6
    bytes an entry; Iso-C: three float64 matrices of the Gram matrix's size (G, its
    eigenvectors, the map); Iso-CTS on a tall matrix:
    seven of them (V_k and V_kΣ_k⁻¹, one task's Gram matrix, its share of the common subspace
    and their product, the eigensolver's vectors and workspace), on a wide one Δ in float32,
    V_cat (n × m) and the N residuals' Y_i (a fifth of that each, at common = 0.8) in float64,
    and three m × m matrices."""
    rows, columns = shape[0], math.prod(shape[1:])
    side = min(rows, columns)
    if method == "ties":
        return 8 * BINS * models * (4 * rows * columns // ROW_BLOCK_BYTES + 1) if kernels else 6 * rows * columns
    if method == "iso-cts" and rows <= columns:
        return 12 * rows * columns + 8 * models * rows * columns // 5 + 3 * 8 * rows**2
    return {"iso-c": 3, "iso-cts": 7}.get(method, 0) * 8 * side**2


def _workspace(config: MergeConfig) -> int:
    module = config.spec.fn.__module__.rsplit(".", 1)[-1]
    return WORKSPACE.get(module, ELEMENTWISE_TEMPORARIES)


@dataclass
class MergePlan(Result):
    SCHEMA = "weightlab.merge-plan/1"
    REFERENCE = "docs/merge.md, Memory and speed: the estimate's formula"
    ORDER = 59

    method: str
    models: list[str]
    base: str | None
    out: str
    merged: int  # tensors the method computes
    in_row_blocks: int  # of which merged a block of rows at a time
    copied: int  # non-floating tensors copied from the base
    left_out: list[str]
    read_bytes: dict[str, int] = field(default_factory=dict)  # per input, each tensor read once
    write_bytes: int = 0
    shards: int = 0
    largest_tensor: str = ""
    largest_tensor_bytes: int = 0  # in the maths' dtype, among tensors merged whole
    peak_memory_bytes: int = 0  # the estimate (module docstring)
    free_bytes: int | None = None  # on the output's filesystem
    passes: int = 1  # reads of every input (LiNeS and model-level NAN need one more)

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> MergePlan:
        return cls(**{k: v for k, v in payload.items() if k != "schema"})

    def title(self) -> str:
        return f"Merge plan: {self.method}, {len(self.models)} models (nothing written)"

    def tables(self) -> list[Table]:
        names = model_names(list(self.read_bytes))
        return [
            Table(
                "bytes each input gives",
                ["input", "read"],
                [[name, human_bytes(b * self.passes)] for name, b in zip(names, self.read_bytes.values())],
            )
        ]

    def lines(self) -> list[str]:
        fits = ""
        if self.free_bytes is not None:
            short = " — not enough: the merge would be refused" if self.write_bytes > self.free_bytes else ""
            fits = f"; {human_bytes(self.free_bytes)} free there{short}"
        return [
            f"would merge {self.merged} tensors ({self.in_row_blocks} a block of rows at a time), copy "
            f"{self.copied} from the base, leave out {len(self.left_out)}",
            f"would read {human_bytes(sum(self.read_bytes.values()) * self.passes)} in {self.passes} "
            f"pass{'es' if self.passes > 1 else ''} and write {human_bytes(self.write_bytes)} in {self.shards} "
            f"shard{'s' if self.shards != 1 else ''} to {self.out}{fits}",
            f"estimated peak memory {human_bytes(self.peak_memory_bytes)} (largest tensor merged whole: "
            f"{self.largest_tensor or '—'}, {human_bytes(self.largest_tensor_bytes)} in the maths' dtype)",
        ]

    def headline(self) -> list[tuple[str, str, object]]:
        return [
            ("plan.read", "to read", human_bytes(sum(self.read_bytes.values()) * self.passes)),
            ("plan.write", "to write", human_bytes(self.write_bytes)),
            ("plan.peak", "estimated peak memory", human_bytes(self.peak_memory_bytes)),
        ]


def plan_merge(
    config: MergeConfig, out: str, opened: Mapping[str, Checkpoint] | None = None, compute: Compute | None = None
) -> MergePlan:
    """The plan of merging `config` into `out` on `compute` (the default: `Compute.create()`),
    from the inputs' headers: nothing is computed or written."""
    compute = compute or Compute.create()
    kernels = ties_kernels.runs_on(compute.device, compute.dtype)
    base, models, walk, buffers, left_out, _ = open_inputs(config, opened or {})
    ckpts = [base, *models] if base is not None else models
    anchor = ckpts[0]
    items = [i for i in walk.items if i.is_float]
    copied = len(walk.items) - len(items) + len(buffers)
    in_rows = {i.names[0] for i in items if in_row_blocks(config, i, ckpts)}
    whole = [i for i in items if i.names[0] not in in_rows]
    maths = 8 if _workspace(config) > ELEMENTWISE_TEMPORARIES else 4
    largest = max(whole, key=lambda i: math.prod(i.shape), default=None)
    t = math.prod(largest.shape) * maths if largest is not None else 0
    n = len(ckpts)
    peak = PROCESS_BYTES + READ_AHEAD_BYTES + (n + 2 + _workspace(config)) * t
    if in_rows:
        split = [i for i in items if i.names[0] in in_rows]
        kept = max((statistics_bytes(config.method, i.shape, len(models), kernels) for i in split), default=0)
        # a block of 16 MB as stored is read as float32 (32 MB from bfloat16): this one and the next
        block = max(ROW_BLOCK_BYTES * 4 // (i.nbytes // max(math.prod(i.shape), 1) or 1) for i in split)
        blocks = 2 * n + 2 + row_workspace(config.method, len(models), kernels)
        # a tensor read more than once, kept whole as read where all inputs fit (`_merge_in_rows`)
        whole_kept = max((i.nbytes * n for i in split if i.nbytes * n <= KEPT_TENSOR_BYTES), default=0)
        kept += whole_kept if config.spec.statistics is not None else 0
        peak = max(peak, PROCESS_BYTES + READ_AHEAD_BYTES + blocks * block + kept)
    if config.spec.calibration:
        peak += sum(math.prod(i.shape) for i in items) * 4 + GRAM_BUDGET
    out_dtype = config.dtype
    plan = stored_plan(anchor, [i.names[0] for i in walk.items] + buffers)
    out_size = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}.get(out_dtype or "")
    write = sum(
        math.prod(shape) * (out_size if out_size and dtype.is_floating_point else dtype.itemsize)
        for _, shape, dtype in plan
    )
    shard_size = parse_size(config.shard_size or DEFAULT_SHARD_SIZE)
    read = {str(c.path): sum(c.info(i.names[k]).nbytes for i in walk.items) for k, c in enumerate(ckpts)}
    passes = 1 + int("lines" in config.modifiers) + int(config.coeff == "nan" and config.nan.granularity == "model")
    return MergePlan(
        config.method,
        list(config.models),
        config.base,
        out,
        len(items),
        len(in_rows),
        copied,
        left_out,
        read,
        write,
        max(1, -(-write // shard_size)),
        largest.names[0] if largest is not None else "",
        t,
        peak,
        free_bytes(out),
        passes,
    )
