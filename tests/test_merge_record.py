"""Every merge output carries `weightlab_merge.yml`, the merge in the words `--config` reads:
`weightlab merge --config OUT/weightlab_merge.yml -o OUT2` makes OUT again, byte for byte, for
every method and modifier, and a merge report rebuilt from its JSON keeps every parameter."""

from __future__ import annotations

import json

import pytest
import yaml

from weightlab import synthetic
from weightlab.merging.config import MergeConfig
from weightlab.merging.methods import METHODS
from weightlab.merging.run import MergeReport

EXTRA = {  # what each method needs beyond the defaults to run quickly on two tiny fine-tunes
    "slerp": ["--param", "t=0.3"],
    "wudi-adam": ["--param", "steps=3"],
    "dare-linear": ["--density", "0.5", "--seed", "7"],
    "dare-ties": ["--density", "0.5", "--seed", "7"],
    "ties": ["--density", "0.4", "--lambda", "0.8"],
    "nearswap": ["--param", "t=0.001"],
}


@pytest.fixture(scope="module")
def fts(zoo, tmp_path_factory):
    root = tmp_path_factory.mktemp("record")
    second = synthetic.save(synthetic.finetune(synthetic.tiny_model("llama", seed=0), steps=2, seed=9), root / "ft2")
    return [str(zoo["llama_ft"]), str(second)]


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    """What the data-aware methods need on the tiny Llamas: a tokenizer of their vocabulary, some text."""
    root = tmp_path_factory.mktemp("calibration")
    synthetic.tiny_tokenizer(root / "tokenizer")
    (root / "texts.txt").write_text("\n".join(synthetic.tiny_texts(6)) + "\n")
    return ["--calibration", root / "texts.txt", "--tokenizer", root / "tokenizer"]


def _files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize(
    "method, modifiers",
    [(m, []) for m in METHODS]
    + [
        ("task-arithmetic", ["--svc", "--param", "svc_alpha=0.7"]),
        ("ties", ["--lines", "--param", "lines_beta=0.3", "--shard-size", "20KB"]),
        ("iso-c", ["--lambda", "auto"]),
    ],
)
def test_the_record_makes_the_output_again_byte_for_byte(method, modifiers, zoo, fts, calibration, run_cli, tmp_path):
    base = [] if method == "slerp" else ["--base", zoo["llama"]]
    if METHODS[method].calibration:
        modifiers = [*modifiers, *calibration]
    first, again = tmp_path / "first", tmp_path / "again"
    models = fts[: METHODS[method].max_models or len(fts)]
    code, _, err = run_cli("merge", "--method", method, *base, *models, *EXTRA.get(method, []), *modifiers, "-o", first)
    assert code == 0, err
    record = yaml.safe_load((first / "weightlab_merge.yml").read_text())
    assert record["method"] == method and record["models"] == models
    code, _, err = run_cli("merge", "--config", first / "weightlab_merge.yml", "-o", again)
    assert code == 0, err
    assert _files(again) == _files(first)


def test_an_adapter_merge_carries_its_record_too(zoo, adapters, run_cli, tmp_path):
    pair = [adapters["llama"], adapters["llama_rslora_pattern"]]
    first, again = tmp_path / "first", tmp_path / "again"
    code, _, err = run_cli(
        "merge",
        "--as-adapter",
        "--method",
        "ties",
        "--base",
        zoo["llama"],
        *pair,
        "--density",
        "0.5",
        "--max-rank",
        "3",
        "-o",
        first,
    )
    assert code == 0, err
    record = yaml.safe_load((first / "weightlab_merge.yml").read_text())
    assert record["as_adapter"] is True and record["max_rank"] == 3
    assert run_cli("merge", "--config", first / "weightlab_merge.yml", "-o", again)[0] == 0
    assert _files(again) == _files(first)


def test_a_report_rebuilt_from_json_keeps_the_modifiers_parameters(zoo, fts, tmp_path):
    """MergeReport.from_dict rebuilt only the method's own parameters: svc_alpha and lines_beta
    came back as their defaults."""
    config = MergeConfig(
        "ties",
        fts,
        str(zoo["llama"]),
        params={"density": 0.3, "svc_alpha": 0.6, "lines_beta": 0.2},
        modifiers=["svc", "lines"],
    )
    report = MergeReport(config, "out", 1, [], [], [1.0, 1.0])
    again = MergeReport.from_dict(json.loads(json.dumps(report.to_dict())))
    assert again.config.resolved.as_dict() == config.resolved.as_dict()
    assert again.config.resolved.svc_alpha == 0.6 and again.config.resolved.lines_beta == 0.2
