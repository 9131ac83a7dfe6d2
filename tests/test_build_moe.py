"""build-moe: an MoE from dense fine-tunes, from mergekit-moe's recipes, equal to what mergekit-moe
itself wrote from them (tests/fixtures/moe, made by make_fixtures.py with mergekit 0.1.5): every
tensor bit for bit once transformers has loaded both, for every gate mode mergekit computes
deterministically and for each output architecture transformers ships."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import weightlab as wl
from weightlab.cli import main

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "moe"
RECIPES = ["mixtral-hidden", "mixtral-cheap", "mixtral-hidden-avg", "qwen-moe", "qwen3-moe"]
CONFIG_KEYS = (
    "architectures",
    "model_type",
    "num_local_experts",
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "decoder_sparse_step",
    "norm_topk_prob",
)


def _load(folder):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model


@pytest.fixture
def in_fixtures(monkeypatch):
    monkeypatch.chdir(FIXTURES)  # the recipes name their models relative to their folder, as mergekit runs them
    before = sorted(p.name for p in FIXTURES.iterdir())
    yield
    assert sorted(p.name for p in FIXTURES.iterdir()) == before  # nothing written beside the inputs


@pytest.mark.parametrize("name", RECIPES)
def test_the_moe_equals_what_mergekit_moe_built_from_the_same_recipe(name, tmp_path, in_fixtures):
    report = wl.build_moe(f"{name}.yml", out=tmp_path / "moe")
    ours, theirs = _load(tmp_path / "moe"), _load(FIXTURES / f"out-{name}")
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    for key in b:
        assert torch.equal(a[key], b[key]), key
    mine = json.loads((tmp_path / "moe" / "config.json").read_text())
    reference = json.loads((FIXTURES / f"out-{name}" / "config.json").read_text())
    assert {k: mine.get(k) for k in CONFIG_KEYS} == {k: reference.get(k) for k in CONFIG_KEYS}
    with torch.no_grad():
        assert torch.isfinite(ours(input_ids=torch.arange(2, 12)[None]).logits).all()
    recipe = yaml.safe_load((FIXTURES / f"{name}.yml").read_text())
    assert report.experts == [e["source_model"] for e in recipe["experts"]]
    assert len(report.gate_condition) == 2 and (tmp_path / "moe" / "tokenizer.json").is_file()


def test_random_router_rows_are_seeded_and_what_their_mode_says(tmp_path, in_fixtures):
    recipe = yaml.safe_load((FIXTURES / "mixtral-hidden.yml").read_text())
    for mode in ("random", "uniform_random"):
        recipe["gate_mode"] = mode
        outs = {}
        for run, seed in (("a", 0), ("b", 0), ("c", 1)):
            wl.build_moe(recipe, out=tmp_path / f"{mode}-{run}", seed=seed)
            outs[run] = (tmp_path / f"{mode}-{run}" / "model.safetensors").read_bytes()
        assert outs["a"] == outs["b"] != outs["c"]
        router = _load(tmp_path / f"{mode}-a").model.layers[0].mlp.gate.weight
        if mode == "uniform_random":
            assert router.abs().max() <= (1 / 32) ** 0.5
        else:
            assert 0.7 < router.std() < 1.3


def test_noise_and_residual_scale_change_only_their_expert(tmp_path, in_fixtures):
    recipe = yaml.safe_load((FIXTURES / "mixtral-hidden.yml").read_text())
    recipe["experts"][1]["noise_scale"] = 0.01
    wl.build_moe(recipe, out=tmp_path / "noisy")
    noisy, plain = _load(tmp_path / "noisy"), _load(FIXTURES / "out-mixtral-hidden")
    for layer in range(2):
        a, b = noisy.model.layers[layer].mlp.experts, plain.model.layers[layer].mlp.experts
        assert torch.equal(a.gate_up_proj[0], b.gate_up_proj[0]) and torch.equal(a.down_proj[2], b.down_proj[2])
        change = (a.gate_up_proj[1] - b.gate_up_proj[1]).std()
        assert 0.007 < change < 0.013


@pytest.mark.parametrize(
    "change, says",
    [
        (lambda r: r.update(architecture="deepseek"), "remote code"),
        (lambda r: r.update(shared_experts=[{"source_model": "llama-ft3"}]), "remote code"),
        (lambda r: r.update(architecture="qwen3"), "no MoE output takes"),
        (lambda r: r.update(architecture="gemma"), "architecture"),
        (lambda r: r.update(gate_modes="hidden"), "keys mergekit-moe does not have"),
        (lambda r: r["experts"][1].pop("positive_prompts"), "positive_prompts"),
        (lambda r: [e.update(positive_prompts=["w1 w2"], negative_prompts=[]) for e in r["experts"]], "same prompts"),
        (lambda r: [e.update(source_model="llama-ft1") for e in r["experts"]], "same model"),
        (lambda r: r.update(experts_per_token=4), "experts_per_token"),
        (lambda r: r.update(gate_mode="hidden_first"), "gate_mode"),
        (lambda r: r["experts"][0].update(noise_scale="lots"), "noise_scale"),
        (lambda r: r["experts"][0].update(source_model="no-such-model"), "no-such-model"),
        (lambda r: r["experts"][0].update(source_model="qwen3-ft1"), "no MoE output takes"),  # another family
    ],
)
def test_a_recipe_mergekit_moe_would_refuse_or_we_cannot_honour_is_refused_in_one_line(
    change, says, tmp_path, in_fixtures, capsys
):
    recipe = yaml.safe_load((FIXTURES / "mixtral-hidden.yml").read_text())
    change(recipe)
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(SystemExit) as refused:
        main(["build-moe", str(path), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert refused.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert says in err and not (tmp_path / "out").exists()


def test_the_command_line_writes_the_recipe_beside_the_model(tmp_path, in_fixtures):
    with pytest.raises(SystemExit) as done:
        main(["build-moe", "qwen3-moe.yml", "-o", str(tmp_path / "moe"), "--json", str(tmp_path / "r.json")])
    assert done.value.code == 0
    written = yaml.safe_load((tmp_path / "moe" / "mergekit_moe_config.yml").read_text())
    assert written["experts"] == yaml.safe_load((FIXTURES / "qwen3-moe.yml").read_text())["experts"]
    assert json.loads((tmp_path / "r.json").read_text())["architecture"] == "Qwen3 MoE"
    shutil.rmtree(tmp_path / "moe")


def test_an_expert_that_is_not_a_fine_tune_of_the_base_is_refused_by_name(tmp_path, in_fixtures):
    from transformers import AutoModelForCausalLM, LlamaConfig

    odd = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=False)  # fmt: skip
    AutoModelForCausalLM.from_config(odd).save_pretrained(tmp_path / "odd")
    recipe = yaml.safe_load((FIXTURES / "mixtral-hidden.yml").read_text())
    recipe["experts"][1]["source_model"] = str(tmp_path / "odd")
    with pytest.raises(wl.WeightlabError, match="not a fine-tune of the base") as refused:
        wl.build_moe(recipe, out=tmp_path / "out")
    assert "odd" in str(refused.value) and "mlp" in str(refused.value) and not (tmp_path / "out").exists()
