"""`--rank-budget`: ranks sum to the budget, spread spectra get more, and PEFT loads the result."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_lora import peft_merged

from weightlab.errors import InvalidArgument
from weightlab.surgery.rank_budget import allocate_ranks, spectral_entropy

SPREAD, PEAKED = "layers.0.self_attn.q_proj.weight", "layers.1.self_attn.q_proj.weight"


def test_energy_keeps_the_largest_energy_shares():
    spectra = {"peaked": torch.tensor([10.0, 0.5, 0.4, 0.3]), "spread": torch.tensor([1.0, 1.0, 0.9, 0.9])}
    ranks = allocate_ranks(spectra, 5, "energy")
    assert ranks == {"peaked": 1, "spread": 4}
    # by a plain search over every split: the kept energy share is the largest possible
    share = {m: (s.double() ** 2 / (s.double() ** 2).sum()).tolist() for m, s in spectra.items()}
    best = max(
        ((a, 5 - a) for a in range(1, 5)), key=lambda r: sum(share["peaked"][: r[0]]) + sum(share["spread"][: r[1]])
    )
    assert (ranks["peaked"], ranks["spread"]) == best


def test_entropy_shares_in_proportion_to_the_effective_rank():
    gen = torch.Generator().manual_seed(0)
    spectra = {
        f"m{i}": torch.sort(torch.rand(16, generator=gen) ** (3 * i + 1), descending=True).values for i in range(4)
    }
    ranks = allocate_ranks(spectra, 20, "entropy")
    assert sum(ranks.values()) == 20 and all(r >= 1 for r in ranks.values())
    eff = {m: math.exp(spectral_entropy(s)) for m, s in spectra.items()}
    target = {m: 20 * e / sum(eff.values()) for m, e in eff.items()}
    assert all(abs(ranks[m] - target[m]) < 1 for m in ranks)  # largest remainder: within one of the exact share
    assert ranks["m0"] == max(ranks.values())  # the flattest spectrum gets the most


def test_caps_and_impossible_budgets():
    spectra = {"a": torch.tensor([1.0, 1.0, 1.0]), "b": torch.tensor([1.0, 0.0, 0.0])}  # b has rank one
    for rule in ("energy", "entropy"):
        assert allocate_ranks(spectra, 4, rule) == {"a": 3, "b": 1}
    with pytest.raises(InvalidArgument, match="exceeds the 4 directions"):
        allocate_ranks(spectra, 5)
    with pytest.raises(InvalidArgument, match="less than the 2 modules"):
        allocate_ranks(spectra, 1)


@pytest.fixture()
def two_spectra_ft(zoo, tmp_path):
    """The tiny Llama with ΔW of six equal directions in one q_proj and one direction in another."""
    ft = tmp_path / "ft"
    shutil.copytree(zoo["llama"], ft)
    tensors = load_file(ft / "model.safetensors")
    gen = torch.Generator().manual_seed(1)
    for name, rank in ((SPREAD, 6), (PEAKED, 1)):
        w = tensors[name]
        u, _ = torch.linalg.qr(torch.randn(w.shape[0], rank, generator=gen))
        v, _ = torch.linalg.qr(torch.randn(w.shape[1], rank, generator=gen))
        tensors[name] = w + 0.3 * u @ v.T
    save_file(tensors, ft / "model.safetensors", metadata={"format": "pt"})
    return ft


@pytest.mark.parametrize("rule", ["energy", "entropy"])
def test_extract_lora_budget_sums_favours_the_spread_module_and_loads_in_peft(
    zoo, two_spectra_ft, run_cli, tmp_path, rule
):
    out = tmp_path / "ex"
    code, _, err = run_cli(
        "extract-lora",
        zoo["llama"],
        two_spectra_ft,
        "--rank-budget",
        "7",
        "--rank-allocation",
        rule,
        "--targets",
        "q_proj",
        "-o",
        out,
    )
    assert code == 0, err
    config = json.loads((out / "adapter_config.json").read_text())
    ranks = {m: config["rank_pattern"].get(m, config["r"]) for m in config["target_modules"]}
    assert ranks == {SPREAD.removesuffix(".weight"): 6, PEAKED.removesuffix(".weight"): 1}
    merged = peft_merged(zoo["llama"], out)
    ft = load_file(two_spectra_ft / "model.safetensors")
    for name in (SPREAD, PEAKED):
        torch.testing.assert_close(merged[name], ft[name], atol=2e-6, rtol=1e-5)  # each ΔW kept whole at its rank


def test_init_lora_budget_reproduces_the_base_and_sums(zoo, run_cli, tmp_path):
    code, _, err = run_cli(
        "init-lora",
        zoo["llama"],
        "--rank-budget",
        "40",
        "--rank-allocation",
        "entropy",
        "--targets",
        "q_proj,v_proj,down_proj",
        "-o",
        tmp_path / "ad",
        "--residual-out",
        tmp_path / "res",
    )
    assert code == 0, err
    sidecar = json.loads((tmp_path / "ad" / "weightlab_lora.json").read_text())
    assert sum(m["rank"] for m in sidecar["modules"]) == 40
    assert len({m["rank"] for m in sidecar["modules"]}) > 1
    merged = peft_merged(tmp_path / "res", tmp_path / "ad")
    from transformers import AutoModel

    for name, w in AutoModel.from_pretrained(zoo["llama"]).state_dict().items():
        torch.testing.assert_close(merged[name], w, atol=2e-6, rtol=1e-5, msg=name)


def test_budget_refusals(zoo, two_spectra_ft, run_cli, tmp_path):
    code, _, err = run_cli(
        "extract-lora",
        zoo["llama"],
        two_spectra_ft,
        "--rank-budget",
        "7",
        "--rank",
        "2",
        "--targets",
        "q_proj",
        "-o",
        tmp_path / "x",
    )
    assert code == 2 and "exactly one" in err
    code, _, err = run_cli(
        "extract-lora", zoo["llama"], two_spectra_ft, "--rank-budget", "50", "--targets", "q_proj", "-o", tmp_path / "x"
    )
    assert code == 2 and "exceeds" in err
    code, _, err = run_cli(
        "init-lora",
        zoo["llama"],
        "--rank-budget",
        "8",
        "--alpha",
        "16",
        "--targets",
        "q_proj",
        "-o",
        tmp_path / "x",
        "--no-residual",
    )
    assert code == 2 and "--alpha" in err
    code, _, err = run_cli(
        "extract-lora",
        zoo["llama"],
        two_spectra_ft,
        "--rank-budget",
        "7",
        "--rank-allocation",
        "magic",
        "--targets",
        "q_proj",
        "-o",
        tmp_path / "x",
    )
    assert code == 2 and "--rank-allocation" in err
    assert not (tmp_path / "x").exists()
