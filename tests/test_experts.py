"""Mixture-of-Experts tensors are experts, never one matrix: transformers' fused layouts (one 3-D
tensor per layer, as every MoE sits in memory in transformers 5) and the per-expert layouts it saves
give the same names and the same figures, in analyses and in merges. Models made by transformers'
own config classes (Mixtral, Qwen2-MoE, Qwen3-MoE, gpt-oss)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import weightlab as wl
from weightlab.errors import UnsupportedLayout
from weightlab.io import open_checkpoint
from weightlab.io.experts import per_expert
from weightlab.naming import as_matrix, canonical_name, expert_index, module_role

SMALL = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def _moe(kind: str, seed: int = 0):
    from transformers import (
        AutoModelForCausalLM,
        DeepseekV3Config,
        GptOssConfig,
        MixtralConfig,
        Qwen2MoeConfig,
        Qwen3MoeConfig,
    )

    config = {
        "mixtral": lambda: MixtralConfig(**SMALL, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
        "qwen3_moe": lambda: Qwen3MoeConfig(
            **SMALL, intermediate_size=48, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2, head_dim=8
        ),
        "qwen2_moe": lambda: Qwen2MoeConfig(
            **SMALL,
            intermediate_size=48,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=40,
            num_experts=4,
            num_experts_per_tok=2,
        ),
        "deepseek_v3": lambda: DeepseekV3Config(  # layer 0 dense, layer 1 MoE with a shared expert
            **{**SMALL, "num_key_value_heads": 4},
            intermediate_size=48,
            moe_intermediate_size=24,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=1,
            n_shared_experts=1,
            kv_lora_rank=16,
            q_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
        ),
        "gpt_oss": lambda: GptOssConfig(
            **SMALL, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, head_dim=8
        ),
    }[kind]()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # distinct experts, as trained ones are
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral", "qwen2_moe"])
def test_fused_experts_in_memory_and_saved_per_expert_give_the_same_figures(kind, tmp_path):
    model = _moe(kind)
    model.save_pretrained(tmp_path / "saved")  # transformers writes one matrix per expert
    fused = {canonical_name(m.name): m for m in wl.esd(model, traps=False, min_evals=4).matrices}
    saved = {canonical_name(m.name): m for m in wl.esd(tmp_path / "saved", traps=False, min_evals=4).matrices}
    assert fused.keys() == saved.keys()
    experts = [n for n in fused if expert_index(n) is not None]
    assert len(experts) == 2 * 4 * 3  # layers × experts × (gate, up, down)
    for name in fused:
        assert fused[name].shape == saved[name].shape
        assert fused[name].weights.alpha == pytest.approx(saved[name].weights.alpha, rel=1e-9, abs=0)
        assert fused[name].weights.lambda_max == pytest.approx(saved[name].weights.lambda_max, rel=1e-6)
    change = wl.spectrum(tmp_path / "saved", model, values_only=True)
    assert len(change.matrices) == len(fused) and max(m.relative_change for m in change.matrices) == 0


def test_each_expert_is_the_matrix_its_layer_multiplies_by(tmp_path):
    """gpt-oss keeps experts in × out with gate and up interleaved: the split matrices are what
    the module computes with (x @ gate_up[e] gives gate at even columns, up at odd)."""
    model = _moe("gpt_oss")
    experts = model.model.layers[0].mlp.experts
    view = per_expert(open_checkpoint(model))
    x = torch.randn(5, 32)
    with torch.no_grad():
        both = x @ experts.gate_up_proj[2] + experts.gate_up_proj_bias[2]
        gate = x @ view.get("model.layers.0.mlp.experts.2.gate_proj.weight").T
        gate = gate + view.get("model.layers.0.mlp.experts.2.gate_proj.bias")
        up = x @ view.get("model.layers.0.mlp.experts.2.up_proj.weight").T
        up = up + view.get("model.layers.0.mlp.experts.2.up_proj.bias")
        torch.testing.assert_close(gate, both[:, ::2])
        torch.testing.assert_close(up, both[:, 1::2])
        h = torch.randn(5, 48)
        down = h @ view.get("model.layers.0.mlp.experts.2.down_proj.weight").T
        torch.testing.assert_close(down, h @ experts.down_proj[2])
    assert view.info("model.layers.0.mlp.experts.2.down_proj.weight").shape == (32, 48)  # out × in


def test_routers_and_shared_experts_are_named_by_role():
    model = _moe("qwen2_moe")
    roles = {n: module_role(n) for n in open_checkpoint(model).names() if "layers.0.mlp" in n}
    assert roles["model.layers.0.mlp.gate.weight"] == "router"
    assert roles["model.layers.0.mlp.shared_expert_gate.weight"] == "router"
    assert roles["model.layers.0.mlp.shared_expert.down_proj.weight"] == "down"
    assert module_role("model.layers.0.block_sparse_moe.gate.weight") == "router"
    assert module_role("model.layers.0.mlp.router.weight") == "router"
    assert (
        canonical_name("model.layers.1.block_sparse_moe.experts.3.w3.weight") == "layers.1.mlp.experts.3.up_proj.weight"
    )


def test_a_tensor_of_unknown_layout_is_never_analysed_as_a_matrix(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "layers.0.mlp.up_proj.weight": torch.randn(16, 8, generator=g),
        "layers.0.mlp.mixer.weight": torch.randn(4, 16, 8, generator=g),  # 3-D, no known layout
    }
    save_file(tensors, tmp_path / "model.safetensors")
    result = wl.esd(tmp_path / "model.safetensors", traps=False, min_evals=4)
    assert [m.name for m in result.matrices] == ["layers.0.mlp.up_proj.weight"]
    assert [(s.name, "no known layout" in s.reason) for s in result.skipped] == [("layers.0.mlp.mixer.weight", True)]
    change = wl.spectrum(tmp_path / "model.safetensors", tmp_path / "model.safetensors", values_only=True)
    assert [m.name for m in change.matrices] == ["layers.0.mlp.up_proj.weight"]
    assert any("layers.0.mlp.mixer.weight" in p and "no known layout" in p for p in change.problems)
    with pytest.raises(UnsupportedLayout, match="not read as a matrix"):
        as_matrix("layers.0.mlp.mixer.weight", tensors["layers.0.mlp.mixer.weight"])
    assert as_matrix("conv.weight", torch.zeros(4, 2, 3)).shape == (4, 6)  # a conv1d kernel is one


@pytest.mark.parametrize("method", ["tsv", "iso-c", "ties", "model-stock"])
def test_merging_fused_experts_merges_each_expert_as_a_matrix(method, tmp_path):
    """The same merge of the same weights, fused in memory and saved per expert: the same experts.
    TSV and Iso-C decompose each matrix; on the fused tensor as one E × (2I·H) matrix they would not."""
    base, a, b = _moe("qwen3_moe", 0), _moe("qwen3_moe", 1), _moe("qwen3_moe", 2)
    for name, m in (("base", base), ("a", a), ("b", b)):
        m.save_pretrained(tmp_path / name)
    fused = wl.merge(base, [a, b], method=method)
    saved = wl.merge(tmp_path / "base", [tmp_path / "a", tmp_path / "b"], method=method)
    gate_up, down = fused["model.layers.1.mlp.experts.gate_up_proj"], fused["model.layers.1.mlp.experts.down_proj"]
    for e in range(4):
        torch.testing.assert_close(gate_up[e][:24], saved[f"model.layers.1.mlp.experts.{e}.gate_proj.weight"])
        torch.testing.assert_close(gate_up[e][24:], saved[f"model.layers.1.mlp.experts.{e}.up_proj.weight"])
        torch.testing.assert_close(down[e], saved[f"model.layers.1.mlp.experts.{e}.down_proj.weight"])


def test_a_merge_into_a_fused_model_loads_and_runs(tmp_path):
    base, a, b = _moe("mixtral", 0), _moe("mixtral", 1), _moe("mixtral", 2)
    merged = wl.merge(base, [a, b], method="tsv", into=_moe("mixtral", 3))
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(merged(ids).logits).all()
    router = wl.merge(base, [a, b], method="tsv")["model.layers.0.mlp.gate.weight"]
    assert torch.equal(merged.model.layers[0].mlp.gate.weight, router)


def test_data_aware_merges_run_moe_models_saved_per_expert_as_transformers_builds_them(tmp_path):
    """RegMean runs the real network, whose experts are fused in memory: the per-expert tensors
    transformers saved (Mixtral's w1/w2/w3) are assembled into it, and the merge of the saved
    models equals the merge of the same models in memory."""
    from test_experts_analysis import _texts

    from weightlab import synthetic

    models = [_moe("mixtral", seed=i) for i in range(2)]
    for i, m in enumerate(models):
        m.save_pretrained(tmp_path / f"m{i}")
    synthetic.tiny_tokenizer(tmp_path / "tok", vocab=64)
    _texts(tmp_path / "texts.txt")
    options = dict(method="regmean", calibration=tmp_path / "texts.txt", tokenizer=tmp_path / "tok")
    saved = wl.merge(None, [tmp_path / "m0", tmp_path / "m1"], out=tmp_path / "saved", **options)
    memory = wl.merge(None, models, out=tmp_path / "memory", **options)
    assert saved.calibration_texts == memory.calibration_texts
    a = per_expert(open_checkpoint(tmp_path / "saved"))
    b = per_expert(open_checkpoint(tmp_path / "memory"))
    assert {canonical_name(n) for n in a.names()} == {canonical_name(n) for n in b.names()}
    by_canonical = {canonical_name(n): n for n in b.names()}
    for name in a.names():
        torch.testing.assert_close(a.get(name), b.get(by_canonical[canonical_name(name)]), rtol=1e-5, atol=1e-6)


def test_a_lora_of_an_moe_targets_what_peft_can_adapt_and_refuses_experts_by_name(tmp_path):
    """transformers holds an MoE's experts fused and its router as its own module: PEFT cannot put
    a LoRA on them as linear modules, so all-linear leaves them out (as PEFT's own all-linear
    does) and naming them is refused; the adapter loads in PEFT with every target found."""
    import warnings

    from peft import PeftModel

    from weightlab.errors import WeightlabError

    base, tuned = _moe("qwen3_moe"), _moe("qwen3_moe")
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.01 * torch.randn_like(p))
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "ft")
    wl.extract_lora(tmp_path / "base", tmp_path / "ft", rank=2, out=tmp_path / "adapter")
    import json

    targets = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_modules"]
    assert targets and not any(".experts." in t or t.endswith(".gate") for t in targets)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # PEFT warns of patterns that match no module
        adapted = PeftModel.from_pretrained(_moe("qwen3_moe"), tmp_path / "adapter")
    assert sum(n.endswith(".lora_A") for n, _ in adapted.named_modules()) == len(targets)
    with pytest.raises(WeightlabError, match="Mixture-of-Experts"):
        wl.extract_lora(tmp_path / "base", tmp_path / "ft", rank=2, targets="gate_proj,q_proj", out=tmp_path / "x")


def test_mitigating_intruders_sees_each_expert_in_memory_and_saved_alike(tmp_path):
    """A fused model in memory and the same model saved per expert: the same experts examined,
    the same intruders scaled, the same weights out (written as transformers saves them)."""
    from transformers import AutoModelForCausalLM

    base, tuned = _moe("qwen3_moe"), _moe("qwen3_moe")
    with torch.no_grad():
        tuned.model.layers[0].mlp.experts.down_proj[1] += 0.5 * torch.outer(torch.randn(32), torch.randn(24))
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "ft")
    memory = wl.mitigate_intruders(base, tuned, out=tmp_path / "m1", epsilon=0.9)
    saved = wl.mitigate_intruders(tmp_path / "base", tmp_path / "ft", out=tmp_path / "m2", epsilon=0.9)
    assert (
        memory.summary() == saved.summary() and memory.summary()["matrices"] == 2 * (4 + 4 * 3 + 1) + 2
    )  # attention, experts, router; embedding, head
    assert "model.layers.0.mlp.experts.1.down_proj.weight" in {m.name for m in saved.matrices if m.intruders}
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "m1").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "m2").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
