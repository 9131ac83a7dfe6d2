"""`tsd`: a planted change along core directions {2, 7} is found, with the right rates."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from weightlab.analysis.tsd import TSDOptions, load_directions, tsd
from weightlab.compute.device import Compute
from weightlab.io import open_checkpoint, open_finetuned

CPU64 = Compute(torch.device("cpu"), torch.float64, 1)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """ΔW = 0.3σ_2·u_2v_2ᵀ + 0.5σ_7·u_7v_7ᵀ on one matrix: δ_2 = 0.3, δ_7 = 0.5, every other δ = 0."""
    root = tmp_path_factory.mktemp("tsd")
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(40, 24, generator=gen, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    delta = 0.3 * s[2] * torch.outer(u[:, 2], vh[2]) + 0.5 * s[7] * torch.outer(u[:, 7], vh[7])
    save_file({"layers.0.self_attn.v_proj.weight": w}, root / "base.safetensors")
    save_file({"layers.0.self_attn.v_proj.weight": w + delta}, root / "ft.safetensors")
    return root


def test_planted_core_directions_are_the_tsds_with_their_rates(planted):
    result, vectors = tsd(
        open_checkpoint(planted / "base.safetensors"),
        open_checkpoint(planted / "ft.safetensors"),
        TSDOptions(top=2),
        CPU64,
        keep_vectors=True,
    )
    m = result.matrices[0]
    assert m.indices == [7, 2]
    assert m.rate == pytest.approx([0.5, 0.3], rel=1e-9)
    assert max(r for i, r in enumerate(m.rates) if i not in (2, 7)) < 1e-12
    assert m.core_energy_share == pytest.approx(1.0) and m.tsd_energy_share == pytest.approx(1.0)
    assert m.percentile == pytest.approx([100 * 7 / 23, 100 * 2 / 23])
    base = open_checkpoint(planted / "base.safetensors").get("layers.0.self_attn.v_proj.weight")
    u, s, _vh = torch.linalg.svd(base, full_matrices=False)
    v = vectors["layers.0.self_attn.v_proj.weight"]
    assert v["u"].shape == (40, 2) and v["v"].shape == (24, 2)
    assert abs(float(v["u"][:, 0] @ u[:, 7])) == pytest.approx(1.0)
    assert v["sigma"].tolist() == pytest.approx([float(s[7]), float(s[2])])


def test_adapter_gives_the_same_tsds_as_its_merged_checkpoint(zoo, adapters, tmp_path):
    from peft import PeftModel
    from transformers import AutoModel

    PeftModel.from_pretrained(
        AutoModel.from_pretrained(zoo["bert"]), adapters["bert"]
    ).merge_and_unload().save_pretrained(tmp_path / "m")
    base = open_checkpoint(zoo["bert"])
    via_adapter, _ = tsd(base, open_finetuned(adapters["bert"], base), TSDOptions(top=4), CPU64)
    dense, _ = tsd(base, open_checkpoint(tmp_path / "m"), TSDOptions(top=4, include="query|value"), CPU64)
    dense_by = {m.name: m for m in dense.matrices}
    assert len(via_adapter.matrices) == 4
    for m in via_adapter.matrices:
        assert m.indices == dense_by[m.name].indices
        assert m.rate == pytest.approx(dense_by[m.name].rate, rel=1e-4)
        assert m.delta_norm == pytest.approx(dense_by[m.name].delta_norm, rel=1e-4)


def test_tsd_cli_saves_directions_for_init_lora(planted, run_cli, tmp_path):
    code, _out, err = run_cli(
        "tsd",
        planted / "base.safetensors",
        planted / "ft.safetensors",
        "--top",
        "3",
        "--save",
        tmp_path / "tsd.safetensors",
        "--json",
        tmp_path / "t.json",
        "--plots",
        tmp_path / "plots",
    )
    assert code == 0, err
    saved = load_directions(tmp_path / "tsd.safetensors")
    assert saved["layers.0.self_attn.v_proj.weight"]["indices"].tolist()[:2] == [7, 2]
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["schema"] == "weightlab.tsd/1" and data["matrices"][0]["indices"][:2] == [7, 2]
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        ".weightlab-output",
        "change_rates.png",
        "tsd_percentiles.png",
    ]
