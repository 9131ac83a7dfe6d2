"""From llama.cpp's names and conventions back to Hugging Face's, per architecture: the tensor
names, the config facts the metadata holds, and the two changes llama.cpp's converter makes to
values (facts from llama.cpp's `convert_hf_to_gguf.py` and gguf-py's `tensor_mapping.py`).

- Llama-family Q and K rows are permuted for llama.cpp's rotary layout (`LlamaModel.permute`):
  each head's rows are interleaved pairs; `unpermute_rows` undoes it.
- Gemma's RMSNorm multiplies by (1 + w); the converter stores w + 1, so 1 is subtracted back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

# GGUF block tensor -> Hugging Face module path inside `model.layers.N.`
LLAMA_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
QK_NORMS = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
GEMMA2_NORMS = {
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
PHI3_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_up": "mlp.gate_up_proj",  # Phi-3 keeps gate and up fused in one matrix, as llama.cpp does
    "ffn_down": "mlp.down_proj",
}
GLOBALS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# tensors llama.cpp computes from the config and stores for speed: not weights of the HF model
DERIVED = {"rope_freqs", "rope_factors_long", "rope_factors_short"}


@dataclass(frozen=True)
class Architecture:
    """How one GGUF `general.architecture` maps to a Hugging Face model class."""

    model_type: str
    hf_class: str
    block: dict[str, str]
    permuted_qk: bool = False  # rows of Q and K in llama.cpp's rotary order
    norm_offset: float = 0.0  # stored = HF + offset for every *norm.weight
    config: dict[str, str] = field(default_factory=dict)  # extra metadata key (after the arch prefix) -> HF key


ARCHITECTURES = {
    "llama": Architecture("llama", "LlamaForCausalLM", LLAMA_BLOCK, permuted_qk=True),
    "qwen2": Architecture("qwen2", "Qwen2ForCausalLM", LLAMA_BLOCK),
    "qwen3": Architecture("qwen3", "Qwen3ForCausalLM", {**LLAMA_BLOCK, **QK_NORMS}),
    "gemma": Architecture("gemma", "GemmaForCausalLM", LLAMA_BLOCK, norm_offset=1.0),
    "gemma2": Architecture(
        "gemma2",
        "Gemma2ForCausalLM",
        {**LLAMA_BLOCK, **GEMMA2_NORMS},
        norm_offset=1.0,
        config={
            "attention.sliding_window": "sliding_window",
            "attn_logit_softcapping": "attn_logit_softcapping",
            "final_logit_softcapping": "final_logit_softcapping",
        },
    ),
    "gemma3": Architecture(
        "gemma3_text",
        "Gemma3ForCausalLM",
        {**LLAMA_BLOCK, **GEMMA2_NORMS, **QK_NORMS},
        norm_offset=1.0,
        config={
            "attention.sliding_window": "sliding_window",
            "final_logit_softcapping": "final_logit_softcapping",
            "rope.freq_base_swa": "rope_local_base_freq",
        },
    ),
    "phi3": Architecture("phi3", "Phi3ForCausalLM", PHI3_BLOCK),
}
CONFIG_KEYS = {  # metadata key after the architecture prefix -> config.json key (every architecture)
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.freq_base": "rope_theta",
    "attention.key_length": "head_dim",
    "vocab_size": "vocab_size",
}
BLOCK_NAME = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
GLOBAL_NAME = re.compile(r"^(\w+)\.(weight|bias)$")


def known_architectures() -> str:
    return ", ".join(sorted(ARCHITECTURES))


def hf_name(arch: Architecture, gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor, or None for one this architecture does not map."""
    if m := BLOCK_NAME.match(gguf_name):
        layer, part, kind = m.groups()
        module = arch.block.get(part)
        return None if module is None else f"model.layers.{int(layer)}.{module}.{kind}"
    if m := GLOBAL_NAME.match(gguf_name):
        module = GLOBALS.get(m.group(1))
        return None if module is None else f"{module}.{m.group(2)}"
    return None


def is_derived(gguf_name: str) -> bool:
    """A tensor llama.cpp stores for speed that the HF model computes (RoPE frequency factors)."""
    return gguf_name.split(".")[0] in DERIVED


def hf_config(arch_name: str, arch: Architecture, metadata: dict[str, Any], tied: bool) -> dict[str, Any]:
    """config.json's facts from the metadata: the same keys transformers' GGUF loader reads."""
    config: dict[str, Any] = {"architectures": [arch.hf_class], "model_type": arch.model_type}
    for key, hf_key in {**CONFIG_KEYS, **arch.config}.items():
        value = metadata.get(f"{arch_name}.{key}")
        if isinstance(value, int) and not isinstance(value, bool):
            config[hf_key] = value
        elif isinstance(value, float):  # a float32: its shortest decimal (1e-06, not 9.99999997e-07)
            config[hf_key] = float(str(np.float32(value)))
    if "vocab_size" not in config and isinstance(metadata.get("tokenizer.ggml.tokens"), list):
        config["vocab_size"] = len(metadata["tokenizer.ggml.tokens"])
    for key, hf_key in [
        ("tokenizer.ggml.bos_token_id", "bos_token_id"),
        ("tokenizer.ggml.eos_token_id", "eos_token_id"),
        ("tokenizer.ggml.padding_token_id", "pad_token_id"),
    ]:
        if isinstance(metadata.get(key), int):
            config[hf_key] = metadata[key]
    config["tie_word_embeddings"] = tied
    return config


def unpermute_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's `permute(w, n_head, n_head_kv)` of Q/K rows (a weight or bias): per head,
    rows stored as (half, pair) go back to (pair, half)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
