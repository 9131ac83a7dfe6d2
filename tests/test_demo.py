"""The tour on the real pretrained MiniLM: brief real fine-tunes, every command, merged accuracy.

This is the slowest test (a minute of training on 2 cores); it trains into a temporary cache.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the fast lane, pytest -m "not slow", leaves these out

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    import weightlab.cli.demo as cli_demo
    from weightlab.cli import main

    root = tmp_path_factory.mktemp("demo")
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_CACHE_HOME", str(root / "cache"))
    real_stages = cli_demo.stages

    @contextmanager
    def recorded(console, name, total):  # the stages the tour announces, as a person sees them
        with real_stages(console, name, total) as step:
            yield lambda text: STAGES.append((total, text)) or step(text)

    mp.setattr(cli_demo, "stages", recorded)
    try:
        main(["demo", "--out", str(root / "out"), "--device", "cpu"])
    except SystemExit as e:
        assert not e.code
    finally:
        mp.undo()
    return root / "out"


STAGES: list[tuple[int, str]] = []


def test_the_tour_counts_its_stages_and_says_where_its_models_live(demo_out):
    assert STAGES and all(total == len(STAGES) for total, _ in STAGES)
    summary = json.loads((demo_out / "summary.json").read_text())
    assert Path(summary["model"]).is_dir()
    for key, ft in summary["fine_tunes"].items():
        assert (Path(ft["path"]) / "weightlab_demo.json").is_file(), key
    assert {p.name for p in (demo_out / "merged").iterdir()} == {
        "task-arithmetic-lambda-0.5",
        "task-arithmetic-lambda-1",
        "nan-weights",
        "nan-task-vectors-lambda-2",
        "ties-nan-density-0.3-lambda-2",
        "ace-default",
        "iso-c-lines-default",
    }


def test_demo_writes_every_result(demo_out):
    for name in (
        "summary.json",
        "spectrum.json",
        "spectrum.csv",
        "angles.json",
        "gaussian.json",
        "tsd.json",
        "tsd.safetensors",
        "merge.json",
        "inventory.json",
    ):
        assert (demo_out / name).is_file(), name
    for sub in ("spectrum", "angles", "gaussian", "tsd"):
        assert list((demo_out / "plots" / sub).glob("*.png")), sub
    assert (demo_out / "lora-init" / "adapter" / "adapter_config.json").is_file()
    assert (demo_out / "lora-init" / "residual" / "config.json").is_file()
    assert (demo_out / "lora-extract" / "adapter_model.safetensors").is_file()


def test_brief_finetunes_learn_their_tasks(demo_out):
    summary = json.loads((demo_out / "summary.json").read_text())
    for key, ft in summary["fine_tunes"].items():
        assert ft["accuracy"]["after"] >= 0.9 > ft["accuracy"]["before"], key


def test_merged_models_keep_accuracy_and_nan_is_compared_with_task_arithmetic(demo_out):
    """Every variant is reported; none is picked after the fact. The mean of the two task vectors
    (task arithmetic λ=0.5, and NAN on weights, whose coefficients come out equal here) keeps
    both tasks well above chance."""
    merges = json.loads((demo_out / "merge.json").read_text())
    summary = json.loads((demo_out / "summary.json").read_text())
    ARTIFACTS.mkdir(exist_ok=True)
    lines = ["method | animal | colour | coefficients"]
    for label, m in merges.items():
        lines.append(
            f"{label} | {m['accuracy']['animal']:.3f} | {m['accuracy']['colour']:.3f} | "
            + ", ".join(f"{c:.3f}" for c in m["coefficients"])
        )
    table = "\n".join(lines)
    print(table)
    (ARTIFACTS / "merge_accuracy.txt").write_text(table + "\n")
    assert {"task-arithmetic λ=0.5", "NAN (weights)", "NAN (task vectors), λ=2"} <= set(merges)
    for label in ("task-arithmetic λ=0.5", "NAN (weights)"):
        acc = merges[label]["accuracy"]
        assert min(acc.values()) >= 0.6, (label, acc)
    before = {k: summary["fine_tunes"][f"ft_{k}"]["accuracy"]["before"] for k in ("animal", "colour")}
    assert all(merges["NAN (weights)"]["accuracy"][k] > before[k] for k in before)


def test_the_merge_table_ranks_every_merge_by_its_mean_and_says_which_keep_both_tasks(demo_out):
    """ACE at its default and docs/merge.md's pick (Iso-C + LiNeS) are scored like the others; the
    table is ordered by mean accuracy, recomputed here from merge.json; the report says plainly
    which merges keep both tasks, with no 'nan' anywhere in it."""
    from conftest import shown_nan

    from weightlab.demo import KEEPS_A_TASK, DemoSummary

    merges = json.loads((demo_out / "merge.json").read_text())
    summary = DemoSummary.from_dict(json.loads((demo_out / "summary.json").read_text()))
    assert {"ACE (default)", "Iso-C + LiNeS (default)"} <= set(merges)
    assert merges["ACE (default)"]["config"]["method"] == "ace"
    table = summary.tables()[0]
    mean_at = table.columns.index("mean")
    expected = sorted(merges, key=lambda label: -sum(merges[label]["accuracy"].values()) / 2)
    assert [row[0] for row in table.rows] == expected
    for row in table.rows:
        assert row[mean_at] == pytest.approx(sum(merges[row[0]]["accuracy"].values()) / 2)
    kept = [label for label in expected if min(merges[label]["accuracy"].values()) >= KEEPS_A_TASK]
    assert summary.lines()[0].endswith(", ".join(kept) or "none")
    html = (demo_out / "report.html").read_text()
    assert "ACE (default)" in html and "best mean first" in html
    assert not shown_nan(html) and not shown_nan((demo_out / "report.md").read_text())


def test_extracted_lora_keeps_the_finetune_accuracy(demo_out):
    summary = json.loads((demo_out / "summary.json").read_text())
    assert summary["extract_lora"]["accuracy_animal"] >= 0.9


def test_tsd_initialised_lora_on_its_residual_is_the_pretrained_model(demo_out):
    import torch
    from peft import PeftModel
    from transformers import AutoModel

    from weightlab.examples import minilm_path

    init = demo_out / "lora-init"
    merged = PeftModel.from_pretrained(
        AutoModel.from_pretrained(init / "residual"), init / "adapter"
    ).merge_and_unload()
    original = AutoModel.from_pretrained(minilm_path()).state_dict()
    for name, w in merged.state_dict().items():
        torch.testing.assert_close(w, original[name], atol=1e-5, rtol=1e-5, msg=name)
