"""`weightlab inspect`: what a checkpoint holds, from headers alone."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from weightlab.cli.app import CsvOpt, ForceOpt, JsonOpt, app, console, emit, outputs, quiet_when_stdout
from weightlab.inventory import inventory
from weightlab.io import open_checkpoint
from weightlab.report.tables import human_bytes, human_count, table


@app.command()
def inspect(
    checkpoint: Path = typer.Argument(..., help="A .safetensors/.bin file, a (sharded) model folder or a PEFT adapter."),
    name_filter: Optional[str] = typer.Option(None, "--filter", help="Only tensors whose name matches this regex."),
    json_out: Optional[str] = JsonOpt,
    csv_out: Optional[str] = CsvOpt,
    force: bool = ForceOpt,
) -> None:
    """List tensors (name, shape, dtype, parameters, bytes, layer, role) and totals per dtype.

    Example: weightlab inspect ./llama-3-8b --filter 'layers\\.0\\.' --json -
    """
    with outputs(force, [checkpoint], json=json_out, csv=csv_out) as plan:
        inv = inventory(open_checkpoint(checkpoint), name_filter)
        emit(plan, inv.to_dict(), [r.__dict__ for r in inv.tensors])
    if quiet_when_stdout(json_out, csv_out):
        return
    rows = [(t.name, "×".join(map(str, t.shape)) or "scalar", t.dtype, human_count(t.parameters), human_bytes(t.bytes),
             t.layer, t.role) for t in inv.tensors]
    console.print(table(f"{inv.path} ({inv.kind})", ["tensor", "shape", "dtype", "params", "bytes", "layer", "role"],
                        rows, numeric_from=3))
    totals = [(t.dtype, t.tensors, human_count(t.parameters), human_bytes(t.bytes)) for t in inv.totals]
    totals.append(("all", sum(t.tensors for t in inv.totals), human_count(inv.parameters), human_bytes(inv.bytes)))
    console.print(table("totals per dtype", ["dtype", "tensors", "params", "bytes"], totals))
    if inv.adapter:
        ranks = sorted({m["rank"] for m in inv.adapter.values()})
        console.print(f"LoRA adapter: {len(inv.adapter)} modules, rank {', '.join(map(str, ranks))}")
