"""init-lora and extract-lora: PEFT loads every adapter we write, and the numbers are right."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModel

from weightlab.io import open_checkpoint
from weightlab.synthetic import rank_one_along


def peft_merged(model_dir, adapter_dir):
    from peft import PeftModel

    return PeftModel.from_pretrained(AutoModel.from_pretrained(model_dir), adapter_dir).merge_and_unload().state_dict()


def test_pissa_equals_peft_pissa_init(zoo, run_cli, tmp_path):
    from peft import LoraConfig, get_peft_model

    code, _, err = run_cli(
        "init-lora",
        zoo["llama"],
        "--method",
        "pissa",
        "--rank",
        "4",
        "--alpha",
        "8",
        "--targets",
        "q_proj,v_proj",
        "-o",
        tmp_path / "ad",
        "--residual-out",
        tmp_path / "res",
    )
    assert code == 0, err
    theirs = get_peft_model(
        AutoModel.from_pretrained(zoo["llama"]),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa"),
    )
    state = theirs.state_dict()
    ours = open_checkpoint(tmp_path / "ad")
    residual = open_checkpoint(tmp_path / "res")
    for module in ours.modules:
        a, b, scale = ours.factors(module)
        assert scale == 2.0
        their_a = state[f"base_model.model.{module}.lora_A.default.weight"]
        their_b = state[f"base_model.model.{module}.lora_B.default.weight"]
        signs = torch.sign((a * their_a).sum(1))  # singular vectors are defined up to sign
        torch.testing.assert_close(a, their_a * signs[:, None], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(b, their_b * signs[None, :], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(
            residual.get(f"{module}.weight"),
            state[f"base_model.model.{module}.base_layer.weight"],
            atol=1e-5,
            rtol=1e-4,
        )


@pytest.mark.parametrize("method", ["pissa", "milora"])
def test_residual_plus_adapter_reproduces_the_base_in_peft(zoo, run_cli, tmp_path, method):
    code, _, err = run_cli(
        "init-lora",
        zoo["llama"],
        "--method",
        method,
        "--rank",
        "3",
        "--targets",
        "all-linear",
        "-o",
        tmp_path / "ad",
        "--residual-out",
        tmp_path / "res",
    )
    assert code == 0, err
    merged = peft_merged(tmp_path / "res", tmp_path / "ad")
    base = AutoModel.from_pretrained(zoo["llama"]).state_dict()
    for name, w in base.items():
        torch.testing.assert_close(merged[name], w, atol=2e-6, rtol=1e-5, msg=name)
    sidecar = json.loads((tmp_path / "ad" / "weightlab_lora.json").read_text())
    indices = sidecar["modules"][0]["indices"]
    n = min(sidecar["modules"][0]["shape"])
    assert indices == ([0, 1, 2] if method == "pissa" else [n - 3, n - 2, n - 1])
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["init_lora_weights"] is True


def test_gpt2_conv1d_adapter_loads_with_fan_in_fan_out(zoo, run_cli, tmp_path):
    code, _, err = run_cli(
        "init-lora",
        zoo["gpt2"],
        "--rank",
        "2",
        "--targets",
        "c_attn,c_fc",
        "-o",
        tmp_path / "ad",
        "--residual-out",
        tmp_path / "res",
    )
    assert code == 0, err
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    merged = peft_merged(tmp_path / "res", tmp_path / "ad")
    for name, w in AutoModel.from_pretrained(zoo["gpt2"]).state_dict().items():
        torch.testing.assert_close(merged[name], w, atol=2e-6, rtol=1e-5, msg=name)


@pytest.fixture()
def planted_ft(zoo, tmp_path):
    """A fine-tune of the tiny Llama that changes q_proj only along core directions 2 and 5."""
    base = open_checkpoint(zoo["llama"])
    tensors = {n: base.get(n) for n in base.names()}
    for layer in (0, 1):
        name = f"layers.{layer}.self_attn.q_proj.weight"
        w = tensors[name]
        s = torch.linalg.svdvals(w.double())
        tensors[name] = w + rank_one_along(w, 2, 0.3 * float(s[2])) + rank_one_along(w, 5, 0.6 * float(s[5]))
    (tmp_path / "planted").mkdir()
    save_file(tensors, tmp_path / "planted" / "model.safetensors")
    (tmp_path / "planted" / "config.json").write_text((zoo["llama"] / "config.json").read_text())
    return tmp_path / "planted"


def test_tsd_init_picks_the_planted_directions(zoo, planted_ft, run_cli, tmp_path):
    code, _, err = run_cli(
        "init-lora",
        zoo["llama"],
        "--tsd",
        "--from",
        planted_ft,
        "--rank",
        "2",
        "--targets",
        "q_proj",
        "-o",
        tmp_path / "ad",
        "--residual-out",
        tmp_path / "res",
    )
    assert code == 0, err
    sidecar = json.loads((tmp_path / "ad" / "weightlab_lora.json").read_text())
    assert [m["indices"] for m in sidecar["modules"]] == [[5, 2], [5, 2]]  # δ_5 = 0.6 > δ_2 = 0.3
    merged = peft_merged(tmp_path / "res", tmp_path / "ad")
    for name, w in AutoModel.from_pretrained(zoo["llama"]).state_dict().items():
        torch.testing.assert_close(merged[name], w, atol=2e-6, rtol=1e-5)


def test_extract_lora_of_a_planted_change_reconstructs_it(zoo, planted_ft, run_cli, tmp_path):
    code, _out, err = run_cli(
        "extract-lora", zoo["llama"], planted_ft, "--rank", "2", "--targets", "q_proj", "-o", tmp_path / "ex"
    )
    assert code == 0, err
    merged = peft_merged(zoo["llama"], tmp_path / "ex")
    ft = open_checkpoint(planted_ft)
    for name in ft.names():
        torch.testing.assert_close(merged[name], ft.get(name), atol=3e-6, rtol=1e-5, msg=name)
    sidecar = json.loads((tmp_path / "ex" / "weightlab_lora.json").read_text())
    assert all(m["relative_error"] < 1e-5 for m in sidecar["modules"])
    from peft import PeftModel

    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = PeftModel.from_pretrained(AutoModel.from_pretrained(zoo["llama"]), tmp_path / "ex")(input_ids=ids)
        expected = AutoModel.from_pretrained(planted_ft)(input_ids=ids)
    torch.testing.assert_close(adapted.last_hidden_state, expected.last_hidden_state, atol=1e-5, rtol=1e-4)


def test_extract_lora_on_a_real_finetune_error_falls_with_rank_and_logits_follow(zoo, run_cli, tmp_path):
    errors = []
    runs = {"r1": ["--rank", "1"], "r4": ["--rank", "4"], "r16": ["--rank", "16"], "full": ["--energy", "1.0"]}
    for key, args in runs.items():
        code, _, err = run_cli("extract-lora", zoo["llama"], zoo["llama_ft"], *args, "-o", tmp_path / key)
        assert code == 0, err
        sidecar = json.loads((tmp_path / key / "weightlab_lora.json").read_text())
        errors.append(sum(m["relative_error"] for m in sidecar["modules"]) / len(sidecar["modules"]))
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-5  # energy 1.0 keeps the full rank
    from peft import PeftModel

    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    ft_out = AutoModel.from_pretrained(zoo["llama_ft"])(input_ids=ids).last_hidden_state
    gaps = []
    for key in ("r1", "full"):
        adapted = PeftModel.from_pretrained(AutoModel.from_pretrained(zoo["llama"]), tmp_path / key)
        # the fine-tune also changed norms and embeddings, which a LoRA of linear layers does not carry
        gaps.append(float((adapted(input_ids=ids).last_hidden_state - ft_out).norm()))
    assert gaps[1] < gaps[0]


def test_extract_lora_energy_records_rank_pattern(zoo, planted_ft, run_cli, tmp_path):
    code, _, err = run_cli(
        "extract-lora",
        zoo["llama"],
        zoo["llama_ft"],
        "--energy",
        "0.5",
        "--targets",
        "q_proj,down_proj",
        "-o",
        tmp_path / "ex",
    )
    assert code == 0, err
    config = json.loads((tmp_path / "ex" / "adapter_config.json").read_text())
    sidecar = json.loads((tmp_path / "ex" / "weightlab_lora.json").read_text())
    ranks = {m["name"].removesuffix(".weight"): m["rank"] for m in sidecar["modules"]}
    assert all(m["energy"] >= 0.5 for m in sidecar["modules"])
    for module, rank in ranks.items():
        assert config["rank_pattern"].get(module, config["r"]) == rank
        assert config["alpha_pattern"].get(module, config["lora_alpha"]) == rank  # scale 1 everywhere
    adapter = open_checkpoint(tmp_path / "ex")
    assert {m: adapter.modules[m].rank for m in adapter.modules} == ranks
    peft_merged(zoo["llama"], tmp_path / "ex")  # PEFT accepts the patterns


def test_plain_lora_conversion_matches_trained_adapter_on_residual(zoo, run_cli, tmp_path):
    run_cli(
        "init-lora",
        zoo["llama"],
        "--rank",
        "2",
        "--targets",
        "q_proj",
        "-o",
        tmp_path / "init",
        "--residual-out",
        tmp_path / "res",
    )
    trained = tmp_path / "trained"
    trained.mkdir()
    (trained / "adapter_config.json").write_text((tmp_path / "init" / "adapter_config.json").read_text())
    from safetensors.torch import load_file

    state = load_file(tmp_path / "init" / "adapter_model.safetensors")
    save_file({k: v + 0.05 * torch.randn_like(v) for k, v in state.items()}, trained / "adapter_model.safetensors")
    code, _, err = run_cli(
        "init-lora", "--as-plain-lora", trained, "--initial", tmp_path / "init", "-o", tmp_path / "plain"
    )
    assert code == 0, err
    on_residual = peft_merged(tmp_path / "res", trained)
    on_base = peft_merged(zoo["llama"], tmp_path / "plain")
    for name, w in on_residual.items():
        torch.testing.assert_close(on_base[name], w, atol=3e-6, rtol=1e-5, msg=name)
    assert json.loads((tmp_path / "plain" / "adapter_config.json").read_text())["r"] == 4


@pytest.mark.parametrize(
    "args, message",
    [
        (["--targets", "nonexistent_proj"], "matches no 2-D weight"),
        (["--targets", "q_proj", "--rank", "64"], "exceeds min(m, n)"),
        (["--targets", "q_proj", "--method", "tsd"], "--from"),
        (["--targets", "q_proj", "--method", "milora", "--svd", "randomized"], "full spectrum"),
    ],
)
def test_bad_init_requests_are_clear_errors_and_write_nothing(zoo, run_cli, tmp_path, args, message):
    code, _, err = run_cli("init-lora", zoo["llama"], *args, "-o", tmp_path / "ad", "--residual-out", tmp_path / "res")
    assert code == 2 and message in err
    assert not (tmp_path / "ad").exists() and not (tmp_path / "res").exists()


def test_adapter_needing_a_residual_is_refused_without_one(zoo, run_cli, tmp_path):
    code, _, err = run_cli("init-lora", zoo["llama"], "--targets", "q_proj", "-o", tmp_path / "ad")
    assert code == 2 and "--residual-out" in err and not (tmp_path / "ad").exists()
    code, _, _ = run_cli("init-lora", zoo["llama"], "--targets", "q_proj", "-o", tmp_path / "ad", "--no-residual")
    assert code == 0 and (tmp_path / "ad" / "adapter_model.safetensors").exists()


def test_extract_from_an_adapter_for_another_base_is_a_shape_error(adapters, run_cli, tmp_path):
    from weightlab import synthetic

    wider = synthetic.save(synthetic.tiny_model("llama", hidden=48), tmp_path / "wide")
    code, _, err = run_cli("extract-lora", wider, adapters["llama"], "--rank", "2", "-o", tmp_path / "ex")
    assert code == 2 and "another base" in err and not (tmp_path / "ex").exists()
