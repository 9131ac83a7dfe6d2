"""examples/notebook.ipynb runs in a real Jupyter kernel: no error, the DataFrames it shows have the
shapes the models imply, the results show as HTML and at least one plot is an image."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "notebook.ipynb"


@pytest.mark.slow
def test_the_notebook_runs_in_a_kernel_and_shows_tables_and_plots(tmp_path):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(c.get("outputs") for c in notebook.cells if c.cell_type == "code")  # stored without outputs
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert not [o for o in outputs if o.output_type == "stream" and o.name == "stderr"]  # no warnings shown
    shown = [o.data for o in outputs if o.output_type in ("execute_result", "display_data")]
    images = [d for d in shown if "image/png" in d]
    assert images, "no plot was shown"
    html = [d["text/html"] for d in shown if "text/html" in d]
    spectrum = next(h for h in html if "weightlab-result" in h)
    assert "<img" in spectrum and "<table>" in spectrum  # the report section: plots and table
    accuracies, changes, pair, scores = [h for h in html if "dataframe" in h]
    assert accuracies.count("</tr>") == 3 and "before" in accuracies and "after" in accuracies  # header + 2
    assert changes.count("</tr>") == 4  # two header rows (roles, then the index's name), one per fine-tune
    assert all(f"<th>{role}</th>" in changes for role in ("q", "k", "v", "o", "up", "down"))
    assert all(f"<th>{name}</th>" in changes and f"<td>{name}</td>" in pair for name in ("animal", "colour"))
    assert scores.count("</tr>") == 4 and "TIES density 0.2" in scores  # header + three ways to get a model
    assert any("StateDict(103 tensors" in d.get("text/plain", "") for d in shown)
