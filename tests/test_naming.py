"""Names: canonical keys across wrappers, layer index and role, GPT-2's transposed Conv1D."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel

from weightlab.io import open_checkpoint
from weightlab.matching import match_checkpoints
from weightlab.naming import as_matrix, canonical_name, is_conv1d, layer_index, matrix_shape, module_role


@pytest.mark.parametrize(
    "name, layer, role",
    [
        ("model.layers.3.self_attn.q_proj.weight", 3, "q"),
        ("model.layers.3.self_attn.k_proj.weight", 3, "k"),
        ("model.layers.3.self_attn.o_proj.weight", 3, "o"),
        ("model.layers.11.mlp.gate_proj.weight", 11, "gate"),
        ("model.layers.11.mlp.up_proj.weight", 11, "up"),
        ("model.layers.11.mlp.down_proj.weight", 11, "down"),
        ("model.embed_tokens.weight", None, "embed"),
        ("lm_head.weight", None, "head"),
        ("model.layers.0.input_layernorm.weight", 0, "norm"),
        ("bert.encoder.layer.5.attention.self.query.weight", 5, "q"),
        ("encoder.layer.5.attention.self.value.weight", 5, "v"),
        ("encoder.layer.5.attention.output.dense.weight", 5, "o"),
        ("encoder.layer.5.intermediate.dense.weight", 5, "up"),
        ("encoder.layer.5.output.dense.weight", 5, "down"),
        ("encoder.layer.5.output.LayerNorm.weight", 5, "norm"),
        ("transformer.h.7.attn.c_attn.weight", 7, "qkv"),
        ("h.7.attn.c_proj.weight", 7, "o"),
        ("h.7.mlp.c_fc.weight", 7, "up"),
        ("h.7.mlp.c_proj.weight", 7, "down"),
        ("wte.weight", None, "embed"),
        ("some.custom.thing", None, "other"),
    ],
)
def test_layer_and_role_are_parsed_for_common_families(name, layer, role):
    assert layer_index(name) == layer
    assert module_role(name) == role


def test_wrapper_prefixes_reduce_to_one_key():
    assert canonical_name("base_model.model.model.layers.0.mlp.up_proj.weight") == "layers.0.mlp.up_proj.weight"
    assert (
        canonical_name("bert.encoder.layer.0.attention.self.query.weight")
        == "encoder.layer.0.attention.self.query.weight"
    )
    assert canonical_name("transformer.h.0.attn.c_attn.weight") == "h.0.attn.c_attn.weight"


def test_gpt2_conv1d_is_seen_out_by_in_and_computes_the_module_output(zoo):
    model = AutoModel.from_pretrained(zoo["gpt2"])
    ckpt = open_checkpoint(zoo["gpt2"])
    name = "h.0.mlp.c_fc.weight"  # Conv1D: stored (in=32, out=128)
    assert ckpt.info(name).shape == (32, 128)
    assert is_conv1d(name, ckpt.config)
    w = as_matrix(name, ckpt.get(name), ckpt.config)
    assert w.shape == (128, 32) == matrix_shape(name, ckpt.info(name).shape, ckpt.config)
    x = torch.randn(5, 32)
    module = model.h[0].mlp.c_fc
    torch.testing.assert_close(x @ w.T + module.bias, module(x))


def test_linear_weights_and_other_families_keep_their_orientation(zoo):
    llama = open_checkpoint(zoo["llama"])
    assert not is_conv1d("layers.0.mlp.up_proj.weight", llama.config)
    from weightlab.model_config import ModelConfig

    bigcode = ModelConfig("gpt_bigcode", 2, True)  # uses c_attn names with nn.Linear
    assert not is_conv1d("h.0.attn.c_attn.weight", bigcode)
    kernel = torch.zeros(8, 3, 2, 2)
    assert as_matrix("conv.weight", kernel).shape == (8, 12)


def test_matching_aligns_wrapped_names_and_reports_leftovers(tmp_path, zoo):
    from safetensors.torch import save_file

    base = open_checkpoint(zoo["llama"])
    wrapped = {f"base_model.model.model.{n}": base.get(n) for n in base.names() if "layers.1." not in n}
    wrapped["base_model.model.model.embed_tokens.weight"] = torch.zeros(200, 32)  # resized vocabulary
    wrapped["base_model.model.extra.weight"] = torch.zeros(2, 2)
    save_file(wrapped, tmp_path / "wrapped.safetensors")
    other = open_checkpoint(tmp_path / "wrapped.safetensors")
    m = match_checkpoints([base, other])
    keys = {t.key for t in m.matched}
    assert "layers.0.self_attn.q_proj.weight" in keys
    assert not any("layers.1." in k for k in keys)
    assert [k for k, _ in m.shape_mismatches] == ["embed_tokens.weight"]
    assert m.unmatched[str(other.path)] == ["base_model.model.extra.weight"]
    assert any("layers.1." in n for n in m.unmatched[str(base.path)])
    problems = "\n".join(m.describe_problems())
    assert "shape mismatch for embed_tokens.weight: [128, 32] vs [200, 32]" in problems
