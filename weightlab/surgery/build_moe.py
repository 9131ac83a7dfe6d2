"""Building a Mixture-of-Experts model from dense fine-tunes of one base, as `mergekit-moe` does
from the same YAML recipe (Goddard et al. 2024, *Arcee's MergeKit*, §4, "mixture of experts").

Each layer's MLP becomes E experts, expert i the MLP of `experts[i].source_model` (its
`noise_scale` adds seeded Gaussian noise, its `residual_scale` scales the down projection);
attention, norms, embeddings and head come from `base_model`. The router row of expert i in layer
l is a unit vector g_{l,i} made from the prompts (`gate_mode`):

- `hidden` (and `hidden_last`): the base model (bfloat16, as mergekit runs it) reads each positive
  prompt, BOS first, left-padded with BOS; h_l is the hidden state entering layer l at the last
  position, averaged over the prompts; the negative prompts' average is subtracted; g = h/‖h‖.
- `hidden_avg`: the same with each prompt's hidden states averaged over its positions (padding
  included, as mergekit divides by the padded length).
- `cheap_embed`: Σ of the prompts' token embeddings over their real tokens, normalised, the
  same in every layer; negative prompts' likewise, subtracted, normalised again.
- `random` N(0, 1) and `uniform_random` U(−1/√H, 1/√H) entries, seeded (mergekit's are not).

Outputs, each written as transformers saves it: Mixtral (Llama or Mistral inputs), Qwen2-MoE
("Qwen MoE": Llama, Mistral or Qwen2 inputs, exactly one shared expert with its own gate row) and
Qwen3-MoE (Qwen3 inputs). mergekit's DeepSeek output needs the model's remote code to load, which
weightlab never runs: refused by name.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from weightlab.domains import typed
from weightlab.errors import InvalidArgument, shown
from weightlab.io.checkpoint import Checkpoint
from weightlab.io.safetensors_file import torch_dtype
from weightlab.io.writer import CheckpointWriter, TensorSpec
from weightlab.results import Result, Table

GATE_MODES = ("hidden", "hidden_last", "hidden_avg", "cheap_embed", "random", "uniform_random")
RECIPE_KEYS = {"base_model", "experts", "gate_mode", "dtype", "experts_per_token", "shared_experts", "architecture"}
EXPERT_KEYS = {"source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale"}
PARTS = ("gate_proj", "up_proj", "down_proj")
DEGENERATE = 5.0  # condition number of a layer's gate rows above which experts are hard to tell apart


@dataclass(frozen=True)
class ExpertSource:
    source_model: str
    positive_prompts: list[str] = field(default_factory=list)
    negative_prompts: list[str] = field(default_factory=list)
    noise_scale: float | None = None
    residual_scale: float | None = None


@dataclass(frozen=True)
class MoERecipe:
    base_model: str
    experts: list[ExpertSource]
    gate_mode: str = "hidden"
    dtype: str | None = None
    experts_per_token: int = 2
    shared_experts: list[ExpertSource] = field(default_factory=list)
    architecture: str | None = None


def _strings(value: Any, where: str, path: str) -> list[str]:
    """A list of strings (prompts), or none."""
    if value is None:
        return []
    return [typed(v, "str", f"{where}[{i}]", path) for i, v in enumerate(typed(value, "list", where, path))]


def _number(value: Any, where: str, path: str) -> float | None:
    """A finite number (a scale), or none."""
    if value is None:
        return None
    if not math.isfinite(typed(value, "number", where, path)):
        raise InvalidArgument(f"{where} must be a finite number, got {shown(value)}", path)
    return float(value)


def _expert(entry: Any, where: str, path: str) -> ExpertSource:
    if not isinstance(entry, dict) or not isinstance(entry.get("source_model"), str) or not entry["source_model"]:
        raise InvalidArgument(f"{where} must be a mapping with a source_model path", path)
    unknown = set(entry) - EXPERT_KEYS
    if unknown:
        raise InvalidArgument(f"{where}: keys mergekit-moe does not have: {', '.join(sorted(map(str, unknown)))}", path)
    return ExpertSource(
        entry["source_model"],
        _strings(entry.get("positive_prompts"), f"{where}.positive_prompts", path),
        _strings(entry.get("negative_prompts"), f"{where}.negative_prompts", path),
        _number(entry.get("noise_scale"), f"{where}.noise_scale", path),
        _number(entry.get("residual_scale"), f"{where}.residual_scale", path),
    )


def parse_recipe(data: Any, path: str) -> MoERecipe:
    """A mergekit-moe recipe (its `MoEMergeConfig`), every key checked; keys it does not have are refused."""
    if not isinstance(data, dict):
        raise InvalidArgument("a mergekit-moe recipe is a mapping (base_model, experts, gate_mode, …)", path)
    unknown = set(data) - RECIPE_KEYS
    if unknown:
        raise InvalidArgument(f"keys mergekit-moe does not have: {', '.join(sorted(map(str, unknown)))}", path)
    if not data.get("base_model") or not typed(data["base_model"], "str", "base_model", path):
        raise InvalidArgument("base_model must be a path", path)
    if not data.get("experts") or not typed(data["experts"], "list", "experts", path):
        raise InvalidArgument("experts must be a list of {source_model, positive_prompts, …}", path)
    mode = data.get("gate_mode", "hidden")
    if mode not in GATE_MODES:
        raise InvalidArgument(f"gate_mode {shown(mode)}: one of {', '.join(GATE_MODES)}", path)
    per_token = data.get("experts_per_token", 2)
    if isinstance(per_token, bool) or not isinstance(per_token, int) or per_token < 1:
        raise InvalidArgument(f"experts_per_token must be a whole number ≥ 1, got {shown(per_token)}", path)
    for key in ("dtype", "architecture"):
        if data.get(key) is not None:
            typed(data[key], "str", key, path)
    shared = typed(data.get("shared_experts") or [], "list", "shared_experts", path)
    recipe = MoERecipe(
        data["base_model"],
        [_expert(e, f"experts[{i}]", path) for i, e in enumerate(data["experts"])],
        mode,
        data.get("dtype"),
        per_token,
        [_expert(e, f"shared_experts[{i}]", path) for i, e in enumerate(shared)],
        data.get("architecture"),
    )
    _check(recipe, path)
    return recipe


def _check(recipe: MoERecipe, path: str) -> None:
    """mergekit-moe's own refusals: more experts per token than experts, missing prompts, every
    expert with the same prompts, every expert the same model."""
    if len(recipe.experts) < recipe.experts_per_token:
        raise InvalidArgument(
            f"experts_per_token {recipe.experts_per_token} but {len(recipe.experts)} experts: give at least as many",
            path,
        )
    if recipe.gate_mode in ("random", "uniform_random"):
        return
    for i, e in enumerate(recipe.experts):
        if not e.positive_prompts:
            raise InvalidArgument(
                f"experts[{i}] has no positive_prompts (gate_mode {recipe.gate_mode} needs them)", path
            )
    prompts = {(tuple(e.positive_prompts), tuple(e.negative_prompts)) for e in recipe.experts}
    if len(recipe.experts) > 1 and len(prompts) == 1:
        raise InvalidArgument("every expert has the same prompts: the router could not tell them apart", path)
    if len(recipe.experts) > 1 and len({e.source_model for e in recipe.experts}) == 1:
        raise InvalidArgument(
            "every expert is the same model: the MoE would compute what it computes, at E× the size", path
        )
    if recipe.shared_experts and len({bool(e.positive_prompts) for e in recipe.shared_experts}) > 1:
        raise InvalidArgument("give prompts for every shared expert or for none", path)


@dataclass(frozen=True)
class Architecture:
    """An MoE output: its name (mergekit's), the dense model types it takes, and its tensor names."""

    name: str
    inputs: tuple[str, ...]
    shared: tuple[int, ...]  # shared-expert counts it takes
    expert: Callable[[int, int, str], str]  # (layer, expert, part) -> name
    router: Callable[[int], str]
    configure: Callable[[Any, int, int], Any]  # (base transformers config, experts, per token) -> config


MIXTRAL_PART = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def _mixtral(base: Any, experts: int, per_token: int) -> Any:
    import transformers

    mistral = base if isinstance(base, transformers.MistralConfig) else transformers.MistralConfig(**base.to_dict())
    mistral.sliding_window = None
    mistral.max_position_embeddings = base.max_position_embeddings
    out = transformers.MixtralConfig(**mistral.to_dict())
    out.architectures = ["MixtralForCausalLM"]
    out.num_local_experts, out.num_experts_per_tok, out.sliding_window = experts, per_token, None
    return out


def _qwen2_moe(base: Any, experts: int, per_token: int) -> Any:
    import transformers

    out = transformers.Qwen2MoeConfig(**base.to_dict())
    out.architectures = ["Qwen2MoeForCausalLM"]
    out.num_experts, out.num_experts_per_tok, out.decoder_sparse_step, out.norm_topk_prob = experts, per_token, 1, True
    out.sliding_window, out.use_sliding_window = None, False
    out.shared_expert_intermediate_size = out.moe_intermediate_size = out.intermediate_size
    return out


def _qwen3_moe(base: Any, experts: int, per_token: int) -> Any:
    import transformers

    out = transformers.Qwen3MoeConfig(**base.to_dict())
    out.architectures = ["Qwen3MoeForCausalLM"]
    out.num_experts, out.num_experts_per_tok, out.decoder_sparse_step, out.norm_topk_prob = experts, per_token, 1, True
    out.moe_intermediate_size = out.intermediate_size
    return out


ARCHITECTURES = (
    Architecture(
        "Mixtral",
        ("llama", "mistral"),
        (0,),
        lambda layer, e, part: f"model.layers.{layer}.block_sparse_moe.experts.{e}.{MIXTRAL_PART[part]}.weight",
        lambda layer: f"model.layers.{layer}.block_sparse_moe.gate.weight",
        _mixtral,
    ),
    Architecture(
        "Qwen MoE",
        ("llama", "mistral", "qwen2"),
        (1,),
        lambda layer, e, part: f"model.layers.{layer}.mlp.experts.{e}.{part}.weight",
        lambda layer: f"model.layers.{layer}.mlp.gate.weight",
        _qwen2_moe,
    ),
    Architecture(
        "Qwen3 MoE",
        ("qwen3",),
        (0,),
        lambda layer, e, part: f"model.layers.{layer}.mlp.experts.{e}.{part}.weight",
        lambda layer: f"model.layers.{layer}.mlp.gate.weight",
        _qwen3_moe,
    ),
)


DEEPSEEK = "DeepSeek MoE"  # mergekit's fourth output, after Mixtral: loads only with remote code


def _takes(name: str, recipe: MoERecipe, kinds: set[str]) -> bool:
    """Whether mergekit's output `name` takes this recipe (its `supports_config`)."""
    shared = recipe.shared_experts
    one_kind = next(iter(kinds)) if len(kinds) == 1 else None
    if name == DEEPSEEK:
        gated = bool(shared) and bool(shared[0].positive_prompts or shared[0].negative_prompts)
        return len(shared) <= 1 and not gated and one_kind in ("llama", "mistral")
    arch = next(a for a in ARCHITECTURES if a.name == name)
    if len(shared) not in arch.shared or one_kind not in arch.inputs:
        return False
    return name != "Qwen MoE" or recipe.gate_mode == "random" or bool(shared[0].positive_prompts)


def choose_architecture(recipe: MoERecipe, model_types: list[str], path: str) -> Architecture:
    """The output mergekit-moe would choose: among those whose name starts with `architecture`
    (all without it) and that take these inputs, Mixtral if it is one, else the first in
    mergekit's order (Mixtral, DeepSeek, Qwen, Qwen3). DeepSeek is refused by name."""
    order = ["Mixtral", DEEPSEEK, "Qwen MoE", "Qwen3 MoE"]
    wanted = (recipe.architecture or "").lower()
    named = [n for n in order if n.lower().startswith(wanted)]
    if not named:
        raise InvalidArgument(f"architecture {shown(recipe.architecture)}: one of {', '.join(order)}", path)
    fits = [n for n in named if _takes(n, recipe, set(model_types))]
    if not fits:
        raise InvalidArgument(
            f"no MoE output takes these inputs ({', '.join(sorted(set(model_types)))} models, "
            f"{len(recipe.shared_experts)} shared experts): Mixtral takes Llama or Mistral models and no shared "
            "expert; Qwen MoE Llama, Mistral or Qwen2 models and one shared expert with prompts; Qwen3 MoE "
            "Qwen3 models and no shared expert",
            path,
        )
    chosen = "Mixtral" if "Mixtral" in fits else fits[0]
    if chosen == DEEPSEEK:
        raise InvalidArgument(
            "mergekit-moe would write a DeepSeek MoE here, which loads only with the model's remote code "
            "(auto_map), and weightlab never runs remote code: give the shared expert prompts (Qwen MoE) or "
            "choose another architecture",
            path,
        )
    return next(a for a in ARCHITECTURES if a.name == chosen)


# ---- router rows ---------------------------------------------------------------------------


def _tokenized(tokenizer: Any, prompts: list[str]) -> Any:
    """mergekit's tokenization: BOS then the prompt, no other special tokens, left-padded."""
    return tokenizer(
        [(tokenizer.bos_token or "") + p for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False
    )


def _hidden(model: Any, tokenizer: Any, prompts: list[str], average: bool) -> torch.Tensor:
    """[L, H]: the hidden state entering each layer, at the last position or averaged over the
    padded positions, averaged over the prompts, in the model's dtype."""
    with torch.no_grad():
        states = torch.stack(model(**_tokenized(tokenizer, prompts), output_hidden_states=True).hidden_states[:-1])
    states = states.sum(dim=2) / states.shape[2] if average else states[:, :, -1, :]
    mean: torch.Tensor = states.sum(dim=1) / states.shape[1]
    return mean


def _cheap(embed: torch.Tensor, tokenizer: Any, prompts: list[str], layers: int) -> torch.Tensor:
    """[L, H]: the prompts' token embeddings summed over real tokens, normalised, in every layer."""
    tokens = _tokenized(tokenizer, prompts)
    onehot = torch.nn.functional.one_hot(tokens["input_ids"], num_classes=embed.shape[0]).float()
    summed: torch.Tensor = (onehot @ embed.float()) * tokens["attention_mask"].unsqueeze(-1)
    summed = summed.sum(dim=1).sum(dim=0, keepdim=True)
    unit: torch.Tensor = summed / summed.norm(dim=-1, keepdim=True).clamp(min=1e-8)
    return unit.repeat(layers, 1)


def gate_vectors(
    recipe: MoERecipe, base: Checkpoint, tokenizer: str, layers: int, hidden: int, seed: int
) -> torch.Tensor:
    """[L, E (+ shared with prompts), H]: each expert's router row per layer (see the module doc)."""
    wanted = list(recipe.experts)
    if recipe.shared_experts and (recipe.shared_experts[0].positive_prompts or recipe.gate_mode.endswith("random")):
        wanted += recipe.shared_experts
    generator = torch.Generator().manual_seed(seed)
    if recipe.gate_mode == "random":
        return torch.randn((layers, len(wanted), hidden), generator=generator)
    if recipe.gate_mode == "uniform_random":
        scale = math.sqrt(1.0 / hidden)
        return torch.rand((layers, len(wanted), hidden), generator=generator) * 2 * scale - scale
    from weightlab.compute.activations import Runner, load_tokenizer

    tok = load_tokenizer(tokenizer)
    tok.padding_side = "left"
    if tok.bos_token_id is not None:  # mergekit pads with BOS, else EOS (a tokenizer with neither: its own pad)
        tok.pad_token_id = tok.bos_token_id
    elif tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    if recipe.gate_mode == "cheap_embed":
        embed = base.get(_embedding_name(base)).float()
        vectors: Callable[[list[str]], torch.Tensor] = partial(_cheap, embed, tok, layers=layers)
    else:
        runner = Runner.build(base, tokenizer, torch.device("cpu"), torch.bfloat16)  # bfloat16, as mergekit runs it
        runner.load(runner.named(base).get)
        vectors = partial(_hidden, runner.model, tok, average=recipe.gate_mode == "hidden_avg")
    rows = []
    for e in wanted:
        h = vectors(e.positive_prompts)
        if e.negative_prompts:
            h = h - vectors(e.negative_prompts)
        rows.append(h / h.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8))
    return torch.stack(rows, dim=0).permute(1, 0, 2).float()


def _embedding_name(base: Checkpoint) -> str:
    for name in ("model.embed_tokens.weight", "embed_tokens.weight"):
        if name in base:
            return name
    raise InvalidArgument("gate_mode cheap_embed: the base has no model.embed_tokens.weight", base.path)


# ---- the model -----------------------------------------------------------------------------


@dataclass
class BuildMoEReport(Result):
    SCHEMA = "weightlab.build-moe/1"
    TITLE = "An MoE built from dense fine-tunes"
    REFERENCE = "Goddard et al. 2024, Arcee's MergeKit (mergekit-moe)"
    ORDER = 64

    out: str
    architecture: str
    base: str
    experts: list[str]
    shared: list[str]
    gate_mode: str
    experts_per_token: int
    dtype: str
    gate_condition: list[float]  # per layer: the condition number of its experts' router rows

    def degenerate(self) -> list[int]:
        return [layer for layer, c in enumerate(self.gate_condition) if not c <= DEGENERATE]

    def tables(self) -> list[Table]:
        return [
            Table(
                f"{self.architecture}: {len(self.experts)} experts, {self.experts_per_token} per token "
                f"(router rows: {self.gate_mode})",
                ["expert", "source model"],
                [[i, m] for i, m in enumerate(self.experts)] + [[f"shared {i}", m] for i, m in enumerate(self.shared)],
            ),
            Table(
                f"router rows per layer: condition number (above {DEGENERATE:g}: experts hard to tell apart)",
                ["layer", "condition number"],
                [[layer, c] for layer, c in enumerate(self.gate_condition)],
            ),
        ]

    def headline(self) -> list[tuple[str, str, object]]:
        return [
            ("moe.architecture", "architecture", self.architecture),
            ("moe.experts", "experts", len(self.experts)),
            ("moe.degenerate", "layers with degenerate router rows", len(self.degenerate())),
        ]

    def lines(self) -> list[str]:
        bad = self.degenerate()
        out = [
            f"note: router rows of layers {', '.join(map(str, bad))} are nearly dependent (condition number > "
            f"{DEGENERATE:g}): the prompts may be too alike, and some experts will be underused"
        ] if bad else []  # fmt: skip
        return [*out, f"{self.architecture} with {len(self.experts)} experts from {self.base} → {self.out}"]


def _torch_dtype(name: str | None, where: str) -> torch.dtype | None:
    if name is None:
        return None
    found = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(found, torch.dtype) or not found.is_floating_point:
        raise InvalidArgument(f"dtype {shown(name)} is not a floating torch dtype", where)
    return found


def plan_build(
    recipe: MoERecipe,
    base: Checkpoint,
    sources: dict[str, Checkpoint],
    arch: Architecture,
    layers: int,
    out_dtype: torch.dtype,
    seed: int,
    routers: torch.Tensor,
) -> tuple[list[TensorSpec], dict[str, Callable[[], torch.Tensor]]]:
    """The output's tensors and how to make each, read one at a time when written."""
    specs: list[TensorSpec] = []
    makers: dict[str, Callable[[], torch.Tensor]] = {}

    def add(
        name: str, shape: tuple[int, ...], make: Callable[[], torch.Tensor], dtype: torch.dtype = out_dtype
    ) -> None:
        specs.append((name, shape, dtype))
        makers[name] = make

    for name in base.names():
        if ".mlp." in name:
            continue
        info = base.info(name)
        stored = torch_dtype(info.dtype, base.path, name)
        add(name, tuple(info.shape), partial(base.get, name), out_dtype if stored.is_floating_point else stored)
    experts = len(recipe.experts)
    for layer in range(layers):
        for e, expert in enumerate(recipe.experts):
            for part in PARTS:
                source = f"model.layers.{layer}.mlp.{part}.weight"
                ckpt = sources[expert.source_model]
                if source not in ckpt:
                    raise InvalidArgument(f"expert {e} has no {source}", ckpt.path, source)
                make = partial(_expert_tensor, ckpt, source, expert, part, seed, (layer, e))
                add(arch.expert(layer, e, part), tuple(ckpt.info(source).shape), make)
        add(arch.router(layer), (experts, routers.shape[-1]), partial(routers[layer, :experts].clone))
        if arch.shared == (1,):
            shared = recipe.shared_experts[0]
            for part in PARTS:
                source = f"model.layers.{layer}.mlp.{part}.weight"
                ckpt = sources[shared.source_model]
                make = partial(_expert_tensor, ckpt, source, shared, part, seed, (layer, -1))
                add(f"model.layers.{layer}.mlp.shared_expert.{part}.weight", tuple(ckpt.info(source).shape), make)
            add(
                f"model.layers.{layer}.mlp.shared_expert_gate.weight",
                (1, routers.shape[-1]),
                partial(routers[layer, experts:].clone),
            )
    return specs, makers


def _same_layers(base: Checkpoint, model: Checkpoint) -> None:
    """An expert's source must be a fine-tune of the base: the same layers, MLPs of the same shapes."""
    layers = {n.split(".")[2] for n in base.names() if n.startswith("model.layers.")}
    theirs = {n.split(".")[2] for n in model.names() if n.startswith("model.layers.")}
    if layers != theirs:
        raise InvalidArgument(
            f"has {len(theirs)} layers where the base has {len(layers)}: not a fine-tune of the base", model.path
        )
    for name in base.names():
        if ".mlp." in name and name in model and tuple(model.info(name).shape) != tuple(base.info(name).shape):
            raise InvalidArgument(
                f"{list(model.info(name).shape)} where the base has {list(base.info(name).shape)}: not a fine-tune "
                "of the base",
                model.path,
                name,
            )


def _expert_tensor(
    ckpt: Checkpoint, name: str, expert: ExpertSource, part: str, seed: int, where: tuple[int, int]
) -> torch.Tensor:
    """An expert's matrix with its noise (seeded by the seed, layer and expert) and residual scale."""
    t = ckpt.get(name)
    if expert.noise_scale is not None:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + where[0] * 1009 + where[1] + 1 + PARTS.index(part))
        t = t + torch.randn(t.shape, generator=generator, dtype=torch.float32).to(t.dtype) * expert.noise_scale
    if part == "down_proj" and expert.residual_scale is not None:
        t = t * expert.residual_scale
    return t


def attention_biases(config: Any, base: Checkpoint, layers: int) -> dict[str, tuple[int, ...]]:
    """Qwen2-MoE's attention has q, k, v biases; a Llama or Mistral base has none: zeros (as mergekit gives)."""
    head = config.hidden_size // config.num_attention_heads
    out: dict[str, tuple[int, ...]] = {}
    for layer in range(layers):
        for proj, heads in (
            ("q", config.num_attention_heads),
            ("k", config.num_key_value_heads),
            ("v", config.num_key_value_heads),
        ):
            name = f"model.layers.{layer}.self_attn.{proj}_proj.bias"
            if name not in base:
                out[name] = (heads * head,)
    return out


def build_moe(
    recipe: MoERecipe,
    path: str,
    out: Path,
    writer_of: Callable[[list[TensorSpec], dict[str, str], Path | None], CheckpointWriter],
    seed: int = 0,
    tokenizer: str | None = None,
) -> BuildMoEReport:
    """Build the MoE `recipe` describes into `writer_of(plan, side files, donor)`'s writer."""
    import yaml

    from weightlab.compute.activations import find_tokenizer, transformers_config
    from weightlab.io.memory import config_text
    from weightlab.io.open import open_weights

    base = open_weights(recipe.base_model)
    sources = {e.source_model: open_weights(e.source_model) for e in [*recipe.experts, *recipe.shared_experts]}
    for ckpt in [base, *sources.values()]:
        if not any(n.startswith("model.layers.") for n in ckpt.names()):
            raise InvalidArgument(
                "not a causal language model as transformers saves one (no model.layers.N.… tensors; "
                "build-moe takes …ForCausalLM checkpoints, as mergekit-moe does)",
                ckpt.path,
            )
    types = [(c.config.model_type if c.config else None) or "unknown" for c in [base, *sources.values()]]
    arch = choose_architecture(recipe, types, path)
    for ckpt in sources.values():
        _same_layers(base, ckpt)
    base_config = transformers_config(base)
    layers, hidden = int(base_config.num_hidden_layers), int(base_config.hidden_size)
    config = arch.configure(base_config, len(recipe.experts), recipe.experts_per_token)
    stored = getattr(base_config, "dtype", None) or getattr(base_config, "torch_dtype", None)
    out_dtype = _torch_dtype(recipe.dtype, path) or (stored if isinstance(stored, torch.dtype) else torch.float32)
    config.dtype = out_dtype
    chosen = None if recipe.gate_mode.endswith("random") else find_tokenizer([base], tokenizer)
    routers = gate_vectors(recipe, base, chosen or "", layers, hidden, seed)
    specs, makers = plan_build(recipe, base, sources, arch, layers, out_dtype, seed, routers)
    if arch.name == "Qwen MoE":
        for name, shape in attention_biases(base_config, base, layers).items():
            specs.append((name, shape, out_dtype))
            makers[name] = partial(torch.zeros, shape)
    files = {
        "config.json": config_text(config.to_dict()),
        "mergekit_moe_config.yml": yaml.safe_dump(_recipe_dict(recipe), sort_keys=False, allow_unicode=True),
    }
    with writer_of(specs, files, base.folder) as writer:
        for name, _, dtype in specs:
            writer.add(name, makers[name]().to(dtype))
    condition = [float(torch.linalg.cond(routers[layer].float())) for layer in range(layers)]
    return BuildMoEReport(
        str(out),
        arch.name,
        recipe.base_model,
        [e.source_model for e in recipe.experts],
        [e.source_model for e in recipe.shared_experts],
        recipe.gate_mode,
        recipe.experts_per_token,
        str(out_dtype).removeprefix("torch."),
        condition,
    )


def _recipe_dict(recipe: MoERecipe) -> dict[str, Any]:
    def expert(e: ExpertSource) -> dict[str, Any]:
        out: dict[str, Any] = {"source_model": e.source_model}
        for key in ("positive_prompts", "negative_prompts", "noise_scale", "residual_scale"):
            if getattr(e, key):
                out[key] = getattr(e, key)
        return out

    out: dict[str, Any] = {"base_model": recipe.base_model, "gate_mode": recipe.gate_mode}
    if recipe.dtype:
        out["dtype"] = recipe.dtype
    out["experts_per_token"] = recipe.experts_per_token
    if recipe.architecture:
        out["architecture"] = recipe.architecture
    out["experts"] = [expert(e) for e in recipe.experts]
    if recipe.shared_experts:
        out["shared_experts"] = [expert(e) for e in recipe.shared_experts]
    return out
