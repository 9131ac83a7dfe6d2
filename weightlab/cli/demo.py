"""`weightlab demo`: the built-in tour on a real pretrained model."""

from __future__ import annotations

from pathlib import Path

import typer

from weightlab.cli.app import ForceOpt, app, console
from weightlab.examples import minilm_path
from weightlab.inventory import inventory
from weightlab.io.atomic import atomic_path
from weightlab.io.checkpoint import open_checkpoint
from weightlab.report.export import to_json
from weightlab.report.tables import human_bytes, human_count


@app.command()
def demo(
    out: Path = typer.Option(Path("weightlab-demo"), "--out", help="Folder for everything the tour writes."),
    force: bool = ForceOpt,
) -> None:
    """Run the tour on all-MiniLM-L6-v2 (offline) and write its results under --out.

    Example: weightlab demo --out ./weightlab-demo
    """
    base = open_checkpoint(minilm_path())
    inv = inventory(base)
    with atomic_path(out, force, directory=True) as tmp:
        (tmp / "inventory.json").write_text(to_json(inv.to_dict()))
    console.print(f"[bold]{base.path}[/]: {len(inv.tensors)} tensors, {human_count(inv.parameters)} parameters, "
                  f"{human_bytes(inv.bytes)}; results in {out}/")
