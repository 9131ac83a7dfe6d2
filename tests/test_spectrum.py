"""`spectrum`: planted changes give known answers; adapters equal their merged checkpoints;
a LoRA-like update creates intruder dimensions where a full-rank one of the same norm does not."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from weightlab.analysis.spectrum import SpectrumOptions, energy_rank, norms_from_singular_values, spectrum
from weightlab.compute.device import Compute
from weightlab.io import open_checkpoint, open_finetuned
from weightlab.synthetic import random_lora_like, rank_one_along

CPU64 = Compute(torch.device("cpu"), torch.float64, 1)


def spread_matrix(m: int, n: int, seed: int, decay: float = 0.85) -> torch.Tensor:
    """A matrix with well-separated singular values 10·decay^i (no near-ties to confuse indices)."""
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=gen, dtype=torch.float64))
    return (u @ torch.diag(10 * decay ** torch.arange(min(m, n), dtype=torch.float64)) @ v.T).float()


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    base = {
        "layers.0.attn.q_proj.weight": spread_matrix(48, 32, 0),
        "layers.1.mlp.up_proj.weight": spread_matrix(64, 32, 1),
        "layers.1.norm.weight": torch.ones(32),
    }
    w = base["layers.0.attn.q_proj.weight"].double()
    s = torch.linalg.svdvals(w)
    amount = 0.5 * float(s[2] - s[3])  # raise σ_3 (0-based) without passing σ_2
    ft = dict(base)
    ft["layers.0.attn.q_proj.weight"] = (w + rank_one_along(w, 3, amount)).float()
    save_file(base, root / "base.safetensors")
    save_file(ft, root / "ft.safetensors")
    return root, amount, s


def test_planted_rank_one_change_amplifies_exactly_that_singular_value(planted):
    root, amount, s = planted
    result = spectrum(
        open_checkpoint(root / "base.safetensors"),
        [open_checkpoint(root / "ft.safetensors")],
        SpectrumOptions(k=8),
        CPU64,
    )
    by_name = {m.name: m for m in result.matrices}
    assert set(by_name) == {"layers.0.attn.q_proj.weight", "layers.1.mlp.up_proj.weight"}
    m = by_name["layers.0.attn.q_proj.weight"]
    expected = [1.0] * 8
    expected[3] = (float(s[3]) + amount) / float(s[3])
    np.testing.assert_allclose(m.amplification, expected, rtol=1e-5)
    np.testing.assert_allclose(m.u_alignment, 1.0, atol=1e-5)
    np.testing.assert_allclose(m.v_alignment, 1.0, atol=1e-5)
    assert m.best_match_index == list(range(10))
    assert (m.delta_rank90, m.delta_rank99) == (1, 1)
    assert m.topk_change_share == pytest.approx(1.0, abs=1e-5)
    assert m.relative_change == pytest.approx(amount / float(s.norm()), rel=1e-5)
    assert m.intruders == [] and m.subspace_similarity == pytest.approx(1.0, abs=1e-6)
    assert m.delta.spectral == pytest.approx(amount, rel=1e-5) and m.delta.stable_rank == pytest.approx(1.0, rel=1e-5)
    untouched = by_name["layers.1.mlp.up_proj.weight"]
    assert untouched.relative_change == 0 and untouched.delta_rank90 == 0
    np.testing.assert_allclose(untouched.amplification, 1.0, rtol=1e-6)


def test_singular_values_in_the_result_equal_numpy(planted):
    root, _, _ = planted
    base = open_checkpoint(root / "base.safetensors")
    result = spectrum(base, [open_checkpoint(root / "ft.safetensors")], SpectrumOptions(keep=5))
    for m in result.matrices:
        ref = np.linalg.svd(base.get(m.name).double().numpy(), compute_uv=False)
        np.testing.assert_allclose(m.sv_base, ref[:5], rtol=1e-5)
        assert len(m.sv_base) == 5


def test_norms_and_ranks_by_hand():
    s = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0]]).sort(descending=True).values
    n, zero = norms_from_singular_values(s)
    assert (n.spectral, n.frobenius) == (4.0, 5.0)
    assert n.stable_rank == pytest.approx(25 / 16)
    p = np.array([4, 3]) / 7
    assert n.effective_rank == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    assert zero == type(n)(0.0, 0.0, 0.0, 0.0)
    assert energy_rank(torch.tensor([[3.0, 2.0, 1.0]]), 0.9).tolist() == [2]  # 13/14 ≥ 0.9
    assert energy_rank(torch.tensor([[3.0, 2.0, 1.0]]), 0.99).tolist() == [3]


def test_several_finetunes_share_one_base_decomposition(planted, monkeypatch):
    import weightlab.compute.spectra as mod

    root, _, _ = planted
    calls = []
    real = mod.decompose
    monkeypatch.setattr(mod, "decompose", lambda w, columns=None: calls.append(columns) or real(w, columns))
    ft = open_checkpoint(root / "ft.safetensors")
    result = spectrum(open_checkpoint(root / "base.safetensors"), [ft, ft, ft])
    # two matrices: one whole base decomposition each, shared by the three fine-tunes, whose own
    # top 10 (and their updates' values) are decomposed each
    assert sorted(calls, key=str) == [0] * 6 + [10] * 6 + [None] * 2
    assert {m.finetuned for m in result.matrices} == {0, 1, 2}


def test_adapter_gives_the_same_numbers_as_its_merged_checkpoint(zoo, adapters, tmp_path):
    from peft import PeftModel
    from transformers import AutoModel

    merged = PeftModel.from_pretrained(AutoModel.from_pretrained(zoo["gpt2"]), adapters["gpt2"]).merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    base = open_checkpoint(zoo["gpt2"])
    via_adapter = spectrum(base, [open_finetuned(adapters["gpt2"], base)], SpectrumOptions(), CPU64)
    dense = spectrum(base, [open_checkpoint(tmp_path / "merged")], SpectrumOptions(), CPU64)
    dense_by_name = {m.name: m for m in dense.matrices}
    assert {m.name for m in via_adapter.matrices} == {
        f"h.{i}.{p}.weight" for i in (0, 1) for p in ("attn.c_attn", "mlp.c_fc")
    }
    for m in via_adapter.matrices:
        d = dense_by_name[m.name]
        assert m.shape == d.shape and m.shape[0] > m.shape[1]  # Conv1D seen out×in: c_fc is 128×32
        for field in ("relative_change", "delta_rank90", "delta_rank99", "subspace_similarity"):
            assert getattr(m, field) == pytest.approx(getattr(d, field), rel=1e-4, abs=1e-6), field
        np.testing.assert_allclose(m.amplification, d.amplification, rtol=1e-5)
        np.testing.assert_allclose(m.sv_ft, d.sv_ft, rtol=1e-5, atol=1e-7)
        assert m.delta.effective_rank == pytest.approx(d.delta.effective_rank, rel=1e-3)  # factored: exactly rank 4


def test_lora_update_creates_intruders_where_full_rank_update_of_same_norm_does_not(tmp_path):
    """Shuttleworth et al.: a low-rank update strong enough to enter the top of the spectrum
    brings singular vectors unlike any base one; full fine-tuning spreads the same norm."""
    names = [f"layers.{i}.mlp.up_proj.weight" for i in range(6)]
    base = {n: spread_matrix(128, 96, i, decay=0.95) for i, n in enumerate(names)}
    norm = 15.0  # 1.5 σ₁ of the base
    lora = {
        n: (w.double() + random_lora_like(128, 96, 1, norm, seed=10 + i)).float()
        for i, (n, w) in enumerate(base.items())
    }
    gen = torch.Generator().manual_seed(0)
    full = {}
    for n, w in base.items():
        noise = torch.randn(128, 96, generator=gen, dtype=torch.float64)
        full[n] = (w.double() + noise * (norm / noise.norm())).float()
    for name, tensors in (("base", base), ("lora", lora), ("full", full)):
        save_file(tensors, tmp_path / f"{name}.safetensors")
    result = spectrum(
        *(open_checkpoint(tmp_path / f"{n}.safetensors") for n in ("base",)),
        [open_checkpoint(tmp_path / "lora.safetensors"), open_checkpoint(tmp_path / "full.safetensors")],
    )
    lora_intruders = [len(m.intruders) for m in result.matrices if m.finetuned == 0]
    full_intruders = [len(m.intruders) for m in result.matrices if m.finetuned == 1]
    lora_change = [m.relative_change for m in result.matrices if m.finetuned == 0]
    full_change = [m.relative_change for m in result.matrices if m.finetuned == 1]
    np.testing.assert_allclose(lora_change, full_change, rtol=1e-4)  # same ‖ΔW‖
    assert all(n >= 1 for n in lora_intruders), lora_intruders
    assert full_intruders == [0] * 6


def test_nan_tensor_is_a_clear_error_naming_it(tmp_path, run_cli):
    w = torch.randn(8, 8)
    save_file({"layers.0.q_proj.weight": w}, tmp_path / "base.safetensors")
    w2 = w.clone()
    w2[3, 3] = float("nan")
    save_file({"layers.0.q_proj.weight": w2}, tmp_path / "ft.safetensors")
    code, _, err = run_cli(
        "spectrum", tmp_path / "base.safetensors", tmp_path / "ft.safetensors", "--json", tmp_path / "out.json"
    )
    assert code == 2 and "layers.0.q_proj.weight" in err and "NaN" in err
    assert not (tmp_path / "out.json").exists()


def test_spectrum_cli_writes_json_csv_and_plots(planted, run_cli, tmp_path):
    root, _, _ = planted
    code, out, err = run_cli(
        "spectrum",
        root / "base.safetensors",
        root / "ft.safetensors",
        "--json",
        tmp_path / "s.json",
        "--csv",
        tmp_path / "s.csv",
        "--plots",
        tmp_path / "plots",
        "--keep",
        "4",
    )
    assert code == 0, err
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["schema"] == "weightlab.spectrum/1" and len(data["matrices"]) == 2
    assert data["matrices"][0]["sv_base"] and len(data["matrices"][0]["sv_base"]) == 4
    assert {row["layer"] for row in data["summary_by_layer"]} == {0, 1}
    header = (tmp_path / "s.csv").read_text().splitlines()[0].split(",")
    assert {"name", "relative_change", "amplification_1", "intruders", "delta_stable_rank"} <= set(header)
    pngs = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert (tmp_path / "plots" / ".weightlab-output").is_file()
    assert pngs == [
        "amplification_heatmap.png",
        "intruders_per_layer.png",
        "reorientation_heatmap.png",
        "spectrum_curves.png",
    ]
    assert all((tmp_path / "plots" / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)
    assert "q_proj" in out and "by layer" in out


def test_spectrum_filters_and_real_finetune_run(zoo, run_cli):
    code, out, _err = run_cli(
        "spectrum", zoo["llama"], zoo["llama_ft"], "--include", r"self_attn", "--exclude", r"k_proj", "--json", "-"
    )
    data = json.loads(out)
    names = {m["name"] for m in data["matrices"]}
    assert code == 0 and names and all("self_attn" in n and "k_proj" not in n for n in names)
    assert all(m["relative_change"] > 0 for m in data["matrices"])  # a real fine-tune changed every one


def test_an_adapters_figures_do_not_depend_on_its_neighbours(zoo, adapters):
    """Given alone, an adapter's spectrum covers the matrices it adapts; beside a dense fine-tune
    (which changes every matrix) its rows and its per-layer and per-role summaries are the same."""
    base = open_checkpoint(zoo["llama"])
    adapter = open_finetuned(adapters["llama"], base)
    alone = spectrum(base, [adapter]).to_dict()
    together = spectrum(base, [open_checkpoint(zoo["llama_ft"]), adapter]).to_dict()
    mine = [m for m in together["matrices"] if m["finetuned"] == 1]
    assert [m["name"] for m in mine] == [m["name"] for m in alone["matrices"]]
    assert mine == [{**m, "finetuned": 1} for m in alone["matrices"]]
    for key in ("summary_by_layer", "summary_by_role"):
        assert [{**s, "finetuned": 1} for s in alone[key]] == [s for s in together[key] if s["finetuned"] == 1]
    assert len([m for m in together["matrices"] if m["finetuned"] == 0]) > len(mine)  # the dense one: every matrix
