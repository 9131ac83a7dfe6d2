"""One result protocol: every result round-trips through its JSON, the report and the CLI know no
result type by name, and a new result type gets a report section with no report code."""

import html
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import weightlab.results as results
from weightlab.analysis.angles import angles
from weightlab.analysis.compare import compare
from weightlab.analysis.esd import ESDOptions, esd
from weightlab.analysis.experts import experts
from weightlab.analysis.gaussian import GaussianOptions, gaussian
from weightlab.analysis.quantization import QuantErrorOptions, quant_error
from weightlab.analysis.spectrum import spectrum
from weightlab.analysis.tsd import tsd
from weightlab.compute.device import Compute
from weightlab.inventory import inventory
from weightlab.io import open_checkpoint
from weightlab.merging import merge
from weightlab.merging.config import build_config
from weightlab.merging.plan import plan_merge
from weightlab.report.catalog import known_schemas
from weightlab.report.document import load_results, parse_result, write_report
from weightlab.report.export import to_json
from weightlab.results import Result, Table, registered
from weightlab.surgery.intruders import IntruderOptions, mitigate_intruders
from weightlab.surgery.lora import LoraInitOptions, extract_lora, init_lora

ROOT = Path(__file__).resolve().parents[1] / "weightlab"
CPU = Compute(torch.device("cpu"), torch.float32, 1)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """One result of every kind, from tiny seeded checkpoints."""
    root = tmp_path_factory.mktemp("results")
    gen = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.mlp.up_proj.weight": torch.randn(12, 8, generator=gen) for i in range(3)}
    for stem, scale in (("base", 0.0), ("a", 0.1), ("b", -0.2)):
        (root / stem).mkdir()
        save_file(
            {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in base.items()},
            root / stem / "model.safetensors",
        )
    b, a, c = (open_checkpoint(root / s) for s in ("base", "a", "b"))
    names = sorted(b.names())
    cfg = build_config(
        {
            "method": "ties",
            "base": str(root / "base"),
            "models": [str(root / "a"), str(root / "b")],
            "param_values": {"density": 0.5},
        }
    )
    return {
        "spectrum": spectrum(b, [a, c], compute=CPU),
        "angles": angles(a, c, b, compute=CPU),
        "gaussian": gaussian(a, b, GaussianOptions(min_elements=16), compute=CPU),
        "tsd": tsd(b, a, compute=CPU)[0],
        "inventory": inventory(a),
        "merge": merge(cfg, root / "merged", compute=CPU),
        "merge-plan": plan_merge(cfg, str(root / "planned")),
        "compare": compare(b, [a, c], compute=CPU),
        "esd": esd(a, b, ESDOptions(min_evals=4), compute=CPU),
        "intruders": mitigate_intruders(b, a, "", IntruderOptions(), compute=CPU)[0],
        "lora-init": init_lora(b, names, LoraInitOptions("pissa", 2), compute=CPU)[0],
        "lora-extract": extract_lora(b, a, names, rank=2, compute=CPU)[0],
        "quant-error": quant_error(b, [a, c], QuantErrorOptions(min_evals=4), compute=CPU),
        "experts": experts(_moe(root), _moe(root, moved=True)),
        "slim-experts": _slimmed(root),
        "build-moe": _built(root),
    }


def _built(root: Path):
    from test_api_boundary import _moe_recipe

    import weightlab as wl

    return wl.build_moe(_moe_recipe(), out=root / "built")


def _slimmed(root: Path):
    from weightlab.io.writer import CheckpointWriter
    from weightlab.options import SlimExpertsOptions
    from weightlab.surgery.slim_experts import plan_slimming, slim_experts, slimmed_tensors

    moe = _moe(root, moved=True, config=True)
    options = SlimExpertsOptions(experts=2)
    planned, counts = plan_slimming(moe, options)
    with CheckpointWriter(root / "slim", plan=slimmed_tensors(moe, planned)[0]) as writer:
        return slim_experts(moe, planned, counts, writer, str(root / "slim"), options)


def _moe(root: Path, moved: bool = False, config: bool = False):
    """A tiny MoE checkpoint: one block of four experts (Qwen's names), a router; `moved`: expert 1 changed."""
    gen = torch.Generator().manual_seed(1)
    tensors = {
        f"model.layers.0.mlp.experts.{e}.{part}.weight": torch.randn(shape, generator=gen)
        for e in range(4)
        for part, shape in (("gate_proj", (6, 8)), ("up_proj", (6, 8)), ("down_proj", (8, 6)))
    }
    tensors["model.layers.0.mlp.gate.weight"] = torch.randn(4, 8, generator=gen)
    if moved:
        tensors["model.layers.0.mlp.experts.1.down_proj.weight"] += 0.1
    folder = root / ("moe-moved" if moved else "moe") / ("with-config" if config else "")
    folder.mkdir(parents=True)
    save_file(tensors, folder / "model.safetensors")
    if config:
        (folder / "config.json").write_text('{"model_type": "qwen3_moe", "num_experts": 4, "num_experts_per_tok": 2}')
    return open_checkpoint(folder)


KINDS = ["spectrum", "angles", "gaussian", "tsd", "inventory", "merge", "compare", "esd", "intruders", "lora-init",
         "lora-extract", "merge-plan", "quant-error", "experts", "slim-experts", "build-moe"]  # fmt: skip


def test_every_kind_of_result_is_made_here(made):
    """Every result type weightlab defines (but the demo's, tested by its own run) is exercised here."""
    ours = {s for s in known_schemas() if registered(s).__module__.startswith("weightlab.")}
    assert {r.SCHEMA for r in made.values()} == ours - {"weightlab.demo/1"}
    assert set(made) == set(KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_a_result_round_trips_through_its_json(made, kind):
    result = made[kind]
    payload = json.loads(to_json(result.to_dict()))
    again = parse_result(payload)
    assert type(again) is type(result)
    assert json.loads(to_json(again.to_dict())) == payload
    assert again.tables() and again.headline()  # the report has something to show


def test_report_and_cli_name_no_schema():
    """Schema strings live only with their result class: bumping a version cannot break `report`."""
    for path in [*(ROOT / "report").glob("*.py"), *(ROOT / "cli").glob("*.py")]:
        assert "weightlab.spectrum/" not in path.read_text() and "weightlab.merging/" not in path.read_text(), path


def test_a_report_from_every_kind_of_result(made, tmp_path):
    sections = write_report(list(made.values()), tmp_path / "r.html")
    assert next(s.title for s in sections) == made["inventory"].title()  # report order: the ORDER of each type
    page = (tmp_path / "r.html").read_text()
    assert all(html.escape(s.title.split(":")[0]) in page for s in sections)


def test_a_new_result_type_gets_a_report_section_without_report_code(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "_TYPES", dict(results._TYPES))

    @dataclass
    class NormsResult(Result):
        SCHEMA = "weightlab.test-norms/1"
        TITLE = "Norms per tensor"
        names: list[str]
        norms: list[float]

        def tables(self) -> list[Table]:
            return [Table("norms", ["tensor", "norm"], [[n, v] for n, v in zip(self.names, self.norms)], names=True)]

        def headline(self):
            return [("norms.largest", "largest norm", max(self.norms))]

    result = NormsResult(["a.weight", "b.weight"], [1.5, 2.5])
    (tmp_path / "n.json").write_text(to_json(result.to_dict()))
    loaded = load_results([tmp_path / "n.json"])
    assert loaded == [result]
    write_report(loaded, tmp_path / "r.html")
    html = (tmp_path / "r.html").read_text()
    assert "Norms per tensor" in html and "b.weight" in html and "data-key='norms.largest'" in html


def test_a_mistyped_result_names_the_field_and_the_schema(made):
    payload = json.loads(to_json(made["tsd"].to_dict()))
    payload["matrices"][0]["indices"] = "7"
    with pytest.raises(
        Exception, match=r"result does not match weightlab.tsd/1 \(matrices\[0\].indices is not a list\)"
    ):
        parse_result(payload, "t.json")
