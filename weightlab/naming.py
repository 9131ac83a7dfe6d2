"""What a tensor name says: its canonical key across wrappers, layer index, module role, orientation."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from weightlab.errors import UnsupportedLayout
from weightlab.model_config import ModelConfig

# Wrapper prefixes that differ between a base model, its task-head variant and a PEFT wrapper.
WRAPPER_PREFIXES = ("base_model.model.", "model.", "bert.", "roberta.", "transformer.", "gpt_neox.", "encoder.model.")

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")

# (pattern on the canonical name, role); first match wins.
_ROLES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(p), role)
    for p, role in [
        (r"(q_proj|attention\.self\.query|attn\.q|\.query)\.weight$", "q"),
        (r"(k_proj|attention\.self\.key|attn\.k|\.key)\.weight$", "k"),
        (r"(v_proj|attention\.self\.value|attn\.v|\.value)\.weight$", "v"),
        (r"(qkv_proj|query_key_value|attn\.c_attn|Wqkv)\.weight$", "qkv"),
        (r"(o_proj|out_proj|attention\.output\.dense|attn\.c_proj|self_attn\.dense|attention\.dense)\.weight$", "o"),
        (r"(mlp|block_sparse_moe|feed_forward)\.(gate|router)\.weight$", "router"),
        (r"shared_expert_gate\.weight$", "router"),
        (r"(gate_proj|w1)\.weight$", "gate"),
        (r"(gate_up_proj)\.weight$", "gate_up"),
        (r"(up_proj|intermediate\.dense|mlp\.c_fc|dense_h_to_4h|fc1|w3)\.weight$", "up"),
        (r"(down_proj|(?<!attention\.)output\.dense|mlp\.c_proj|dense_4h_to_h|fc2|w2)\.weight$", "down"),
        (r"(embed_tokens|word_embeddings|wte|embed_in)\.weight$", "embed"),
        (r"(position_embeddings|wpe|token_type_embeddings)\.weight$", "pos_embed"),
        (r"(lm_head|embed_out)\.weight$", "head"),
        (r"(norm|LayerNorm|ln_\d|ln_f|layernorm)\.(weight|bias)$", "norm"),
        (r"\.bias$", "bias"),
    ]
]

# GPT-2-family Conv1D modules store weights in x out; analyses must see out x in.
_CONV1D_NAME = re.compile(r"(?:^|\.)h\.\d+\.(?:attn|mlp|crossattention)\.(?:c_attn|c_proj|c_fc|q_attn)\.weight$")
_CONV1D_MODEL_TYPES = {"gpt2", "openai-gpt", "imagegpt", "decision_transformer"}


# Mixtral's saved per-expert names and the names of its experts split from transformers' fused
# tensors (`io.experts`): w1 is the gate, w3 the up projection, w2 the down one.
_MIXTRAL = [
    (re.compile(r"(^|\.)block_sparse_moe\."), r"\1mlp."),
    (re.compile(r"(\.experts\.\d+\.)w1\."), r"\1gate_proj."),
    (re.compile(r"(\.experts\.\d+\.)w3\."), r"\1up_proj."),
    (re.compile(r"(\.experts\.\d+\.)w2\."), r"\1down_proj."),
]


def canonical_name(name: str) -> str:
    """Strip wrapper prefixes so `base_model.model.model.layers.0...` and `layers.0...` meet, and
    spell Mixtral's experts as every other MoE does (`block_sparse_moe.experts.N.w1` is
    `mlp.experts.N.gate_proj`)."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
    if "block_sparse_moe" in name:
        for pattern, replacement in _MIXTRAL:
            name = pattern.sub(replacement, name)
    return name


_EXPERT = re.compile(r"\.experts\.(\d+)\.")


def expert_index(name: str) -> int | None:
    """The expert a Mixture-of-Experts tensor belongs to (`mlp.experts.5.down_proj`), else None."""
    found = _EXPERT.search(name)
    return int(found.group(1)) if found else None


_EXPERT_SITE = re.compile(r"^(?P<block>.+)\.experts\.(?P<expert>\d+)\.(?P<part>[^.]+)\.weight$")
_ROUTER = re.compile(r"^(?P<block>.+)\.(?:gate|router)\.weight$")


def expert_site(name: str) -> tuple[str, int, str] | None:
    """(MoE block, expert, part) of a routed expert's weight, by its canonical name
    (`layers.3.mlp.experts.5.down_proj.weight` -> ("layers.3.mlp", 5, "down_proj")), else None.
    Shared experts (`mlp.shared_expert.…`) are not routed experts."""
    found = _EXPERT_SITE.match(canonical_name(name))
    return (found["block"], int(found["expert"]), found["part"]) if found else None


def router_block(name: str) -> str | None:
    """The MoE block whose experts a router weight scores (`layers.3.mlp.gate.weight` ->
    "layers.3.mlp"), by canonical name; None for any other tensor (a shared expert's gate too)."""
    if module_role(name) != "router":
        return None
    found = _ROUTER.match(canonical_name(name))
    return found["block"] if found else None


def layer_index(name: str) -> int | None:
    """The transformer block index in a name, or None (embeddings, head, unknown families)."""
    found = _LAYER.search(name)
    return int(found.group(1)) if found else None


def renumbered(name: str, layer: int) -> str:
    """`name` with its layer index (`layer_index`) replaced by `layer`."""
    return _LAYER.sub(lambda m: m.group(0).replace(m.group(1), str(layer)), name, count=1)


def before_layers(name: str) -> bool:
    """Whether a tensor outside the layers comes before them (embeddings) rather than after them
    (the final norm, the head): what a model's first layers read, not its last layers' output."""
    return module_role(name) in ("embed", "pos_embed") or "embed" in name.rsplit(".", 2)[0]


def module_role(name: str) -> str:
    """A short role label: q/k/v/qkv/o/gate/up/down/embed/head/norm/bias/other."""
    key = canonical_name(name)
    for pattern, role in _ROLES:
        if pattern.search(key):
            return role
    return "other"


def is_conv1d(name: str, config: ModelConfig | None = None) -> bool:
    """True when the weight is stored transposed (in x out), as in GPT-2's Conv1D."""
    if not _CONV1D_NAME.search(name):
        return False
    if config is not None and config.model_type:
        return config.model_type in _CONV1D_MODEL_TYPES
    return True  # GPT-2 naming without a config: these names are Conv1D there


def is_conv_kernel(name: str, shape: Sequence[int]) -> bool:
    """A convolution kernel (out × in × k…): 4-D and 5-D weights, and 3-D ones named conv. Any
    other tensor of more than two dimensions (fused MoE experts: `io.experts`) is no matrix."""
    return len(shape) in (4, 5) or (len(shape) == 3 and "conv" in name.lower())


def as_matrix(name: str, tensor: torch.Tensor, config: ModelConfig | None = None) -> torch.Tensor:
    """The out x in matrix the maths sees: Conv1D transposed, conv kernels out x (in*kh*kw). A
    tensor of more than two dimensions of any other layout is refused, never reshaped by guess."""
    if is_conv1d(name, config):
        return tensor.T
    if tensor.ndim > 2:
        if not is_conv_kernel(name, tuple(tensor.shape)):
            raise UnsupportedLayout(
                f"a {tensor.ndim}-D tensor {list(tensor.shape)} of no known layout (a convolution kernel or "
                "a Mixture-of-Experts expert tensor) is not read as a matrix",
                None,
                name,
            )
        return tensor.reshape(tensor.shape[0], -1)
    return tensor


def from_matrix(
    name: str, matrix: torch.Tensor, shape: Sequence[int], config: ModelConfig | None = None
) -> torch.Tensor:
    """The inverse of `as_matrix`: the out x in matrix back in the stored layout `shape`."""
    return matrix.T if is_conv1d(name, config) else matrix.reshape(tuple(shape))


def matrix_shape(name: str, shape: tuple[int, ...], config: ModelConfig | None = None) -> tuple[int, int] | None:
    """Shape `as_matrix` gives, from a header shape alone; None for 0/1-D tensors."""
    if len(shape) < 2:
        return None
    if is_conv1d(name, config):
        return shape[1], shape[0]
    rest = 1
    for d in shape[1:]:
        rest *= d
    return shape[0], rest
