"""What a checkpoint holds, from headers alone: `weightlab inspect`."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from weightlab.display import human_bytes
from weightlab.domains import compile_filter
from weightlab.io.adapter import LoraAdapter
from weightlab.io.checkpoint import Checkpoint
from weightlab.io.safetensors_file import TensorInfo
from weightlab.naming import layer_index, module_role
from weightlab.report.tables import human_count
from weightlab.results import Result, Table


@dataclass(frozen=True)
class TensorRow:
    name: str
    shape: list[int]
    dtype: str  # how it is stored: a dtype code (BF16) or a quantization format (Q4_K, GPTQ int4 g128)
    parameters: int
    bytes: int  # in the file
    layer: int | None
    role: str
    bits_per_weight: float = 0.0  # stored bits per value, scales and zero points included
    reads_as: str = ""  # the dtype a read returns, when it is not the stored one (quantized tensors)


@dataclass(frozen=True)
class DtypeTotal:
    dtype: str
    tensors: int
    parameters: int
    bytes: int

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes / self.parameters if self.parameters else 0.0


@dataclass
class Inventory(Result):
    SCHEMA = "weightlab.inventory/1"
    TITLE = "What the checkpoint holds"
    ORDER = 5

    path: str
    kind: str
    tensors: list[TensorRow]
    totals: list[DtypeTotal]
    model_type: str | None = None
    num_layers: int | None = None
    adapter: dict | None = None  # for LoRA adapters: rank, alpha, scale per module

    @property
    def parameters(self) -> int:
        return sum(t.parameters for t in self.totals)

    @property
    def bytes(self) -> int:
        return sum(t.bytes for t in self.totals)

    def to_dict(self) -> dict:
        return {"schema": self.SCHEMA, **asdict(self), "parameters": self.parameters, "bytes": self.bytes}

    def rows(self) -> list[dict]:
        return [asdict(r) for r in self.tensors]

    def tables(self) -> list[Table]:
        totals = [
            [t.dtype, t.tensors, human_count(t.parameters), human_bytes(t.bytes), round(t.bits_per_weight, 2)]
            for t in self.totals
        ]
        everything = DtypeTotal("all", sum(t.tensors for t in self.totals), self.parameters, self.bytes)
        totals.append(
            [
                "all",
                everything.tensors,
                human_count(self.parameters),
                human_bytes(self.bytes),
                round(everything.bits_per_weight, 2),
            ]
        )
        return [
            Table(
                f"{self.path} ({self.kind})",
                ["tensor", "shape", "stored as", "bits/weight", "params", "bytes", "layer", "role"],
                [
                    [
                        t.name,
                        "×".join(map(str, t.shape)) or "scalar",
                        t.dtype,
                        round(t.bits_per_weight, 2),
                        human_count(t.parameters),
                        human_bytes(t.bytes),
                        t.layer,
                        t.role,
                    ]
                    for t in self.tensors
                ],
                numeric_from=3,
            ),
            Table("totals per storage format", ["stored as", "tensors", "params", "bytes", "bits/weight"], totals),
        ]

    def lines(self) -> list[str]:
        if not self.adapter:
            return []
        ranks = sorted({m["rank"] for m in self.adapter.values()})
        return [f"LoRA adapter: {len(self.adapter)} modules, rank {', '.join(map(str, ranks))}"]

    def headline(self) -> list[tuple[str, str, object]]:
        return [
            ("inventory.tensors", "tensors", len(self.tensors)),
            ("inventory.parameters", "parameters", self.parameters),
            ("inventory.bytes", "bytes", human_bytes(self.bytes)),
        ]

    def note(self) -> str:
        return f"{self.path} ({self.kind}" + (f", {self.model_type}" if self.model_type else "") + ")"


def inventory(ckpt: Checkpoint | LoraAdapter, name_filter: str | None = None) -> Inventory:
    """List every tensor (name, shape, dtype, size, layer, role) and totals per dtype."""
    pattern = compile_filter(name_filter, "--filter")
    infos = ckpt.file.infos.values() if isinstance(ckpt, LoraAdapter) else (ckpt.info(n) for n in ckpt.names())
    rows = [_row(i) for i in infos if pattern is None or pattern.search(i.name)]
    by_dtype: dict[str, list[TensorRow]] = {}
    for row in rows:
        by_dtype.setdefault(row.dtype, []).append(row)
    totals = [
        DtypeTotal(d, len(r), sum(x.parameters for x in r), sum(x.bytes for x in r))
        for d, r in sorted(by_dtype.items())
    ]
    if isinstance(ckpt, LoraAdapter):
        adapter = {m.module: {"rank": m.rank, "alpha": m.alpha, "scale": m.scale} for m in ckpt.modules.values()}
        return Inventory(str(ckpt.path), "lora-adapter", rows, totals, adapter=adapter)
    config = ckpt.config
    return Inventory(
        str(ckpt.path),
        type(ckpt).__name__.removesuffix("Checkpoint").lower() or "checkpoint",
        rows,
        totals,
        config.model_type if config else None,
        config.num_layers if config else None,
    )


def _row(i: TensorInfo) -> TensorRow:
    """A tensor as stored: a quantized one by its format, stored bytes and bits per weight."""
    if i.stored is not None:
        return TensorRow(
            i.name,
            list(i.shape),
            i.stored.format,
            i.numel,
            i.stored.nbytes,
            layer_index(i.name),
            module_role(i.name),
            i.stored.bits_per_weight,
            i.dtype,
        )
    bits = 8 * i.nbytes / i.numel if i.numel else 0.0
    return TensorRow(i.name, list(i.shape), i.dtype, i.numel, i.nbytes, layer_index(i.name), module_role(i.name), bits)
