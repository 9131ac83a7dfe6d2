"""`weightlab report`: one self-contained HTML page (and Markdown) from JSON results."""

from __future__ import annotations

from pathlib import Path

import typer

from weightlab.cli.app import ForceOpt, app, console
from weightlab.io.outputs import plan_outputs
from weightlab.report.document import assets_folder, load_results, result_files, write_report


@app.command()
def report(
    results: list[Path] = typer.Argument(..., help="JSON results of weightlab commands, or folders holding them."),
    out: Path = typer.Option(Path("report.html"), "-o", "--out", help="The HTML file to write."),
    markdown: Path | None = typer.Option(
        None, "--markdown", help="Also write Markdown (PNGs beside it in NAME_assets/)."
    ),
    title: str = typer.Option("weightlab report", "--title", help="Title of the page."),
    force: bool = ForceOpt,
) -> None:
    """Summary first, then each analysis with its plots and a sortable table; opens from disk, no network.

    Example: weightlab report spectrum.json angles.json merged/weightlab_merge.json -o report.html --markdown report.md
    """
    files = result_files(results)
    assets = assets_folder(markdown) if markdown else None
    with plan_outputs(force, files, out_file=out, markdown=markdown, markdown_assets_dir=assets) as plan:
        sections = write_report(
            load_results(results),
            plan.path("-o"),
            title=title,
            markdown=plan.path("--markdown") if markdown else None,
            assets=plan.path("--markdown (its _assets folder)") if markdown else None,
        )
    console.print(f"report with {len(sections)} sections → {out}" + (f" and {markdown}" if markdown else ""))
