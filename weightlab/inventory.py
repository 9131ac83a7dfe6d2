"""What a checkpoint holds, from headers alone: `weightlab inspect`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from weightlab.io.adapter import LoraAdapter
from weightlab.io.checkpoint import Checkpoint
from weightlab.domains import compile_filter
from weightlab.naming import layer_index, module_role

SCHEMA = "weightlab.inventory/1"


@dataclass(frozen=True)
class TensorRow:
    name: str
    shape: list[int]
    dtype: str
    parameters: int
    bytes: int
    layer: int | None
    role: str


@dataclass(frozen=True)
class DtypeTotal:
    dtype: str
    tensors: int
    parameters: int
    bytes: int


@dataclass
class Inventory:
    path: str
    kind: str
    tensors: list[TensorRow]
    totals: list[DtypeTotal]
    model_type: str | None = None
    num_layers: int | None = None
    adapter: dict | None = None  # for LoRA adapters: rank, alpha, scale per module
    schema: str = field(default=SCHEMA)

    @property
    def parameters(self) -> int:
        return sum(t.parameters for t in self.totals)

    @property
    def bytes(self) -> int:
        return sum(t.bytes for t in self.totals)

    def to_dict(self) -> dict:
        return {"schema": self.schema, **{k: v for k, v in asdict(self).items() if k != "schema"},
                "parameters": self.parameters, "bytes": self.bytes}


def inventory(ckpt: Checkpoint | LoraAdapter, name_filter: str | None = None) -> Inventory:
    """List every tensor (name, shape, dtype, size, layer, role) and totals per dtype."""
    pattern = compile_filter(name_filter, "--filter")
    infos = ckpt.file.infos.values() if isinstance(ckpt, LoraAdapter) else (ckpt.info(n) for n in ckpt.names())
    rows = [
        TensorRow(i.name, list(i.shape), i.dtype, i.numel, i.nbytes, layer_index(i.name), module_role(i.name))
        for i in infos
        if pattern is None or pattern.search(i.name)
    ]
    by_dtype: dict[str, list[TensorRow]] = {}
    for row in rows:
        by_dtype.setdefault(row.dtype, []).append(row)
    totals = [DtypeTotal(d, len(r), sum(x.parameters for x in r), sum(x.bytes for x in r)) for d, r in sorted(by_dtype.items())]
    if isinstance(ckpt, LoraAdapter):
        adapter = {m.module: {"rank": m.rank, "alpha": m.alpha, "scale": m.scale} for m in ckpt.modules.values()}
        return Inventory(str(ckpt.path), "lora-adapter", rows, totals, adapter=adapter)
    config = ckpt.config
    return Inventory(str(ckpt.path), type(ckpt).__name__.removesuffix("Checkpoint").lower() or "checkpoint", rows, totals,
                     config.model_type if config else None, config.num_layers if config else None)
