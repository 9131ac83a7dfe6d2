"""Generate Llama-shaped checkpoints for the benchmarks (cached under .bench/).

Defaults: transformers' `LlamaConfig` with hidden 1024, 16 layers, intermediate 2816 and vocab
32000, about 271M parameters (1.0 GB in float32) with untied embeddings. Each matrix is
G·diag(d)·0.02 with G standard Gaussian and d_j = (1 + j)^(-1/2) rescaled to unit mean square:
a decaying spectrum with separated top singular values, as trained weights have, instead of the
flat Marchenko–Pastur bulk of a pure Gaussian. A fine-tune adds a small dense update and a
stronger rank-4 one. Tensors are generated and written one shard at a time, so generation
itself stays bounded; mergekit, WeightWatcher and transformers load the folders as they are.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent / ".bench"


@dataclass(frozen=True)
class Shape:
    layers: int = 16
    hidden: int = 1024
    vocab: int = 32000
    intermediate_size: int | None = None  # default 11·hidden/4 (2816 for hidden 1024); Llama-2-7B: 11008
    dtype: str = "float32"  # what the files hold: float32 or bfloat16

    @property
    def intermediate(self) -> int:
        return self.intermediate_size or 11 * self.hidden // 4

    @property
    def heads(self) -> int:
        return max(1, self.hidden // 64)

    def config(self) -> dict:
        from transformers import LlamaConfig

        config = LlamaConfig(
            hidden_size=self.hidden,
            num_hidden_layers=self.layers,
            intermediate_size=self.intermediate,
            vocab_size=self.vocab,
            num_attention_heads=self.heads,
            num_key_value_heads=self.heads,
            tie_word_embeddings=False,
            torch_dtype=self.dtype,
        )
        return {**config.to_dict(), "architectures": ["LlamaForCausalLM"]}

    def tensors(self) -> dict[str, tuple[int, ...]]:
        h, i = self.hidden, self.intermediate
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab, h)}
        for layer in range(self.layers):
            p = f"model.layers.{layer}."
            for proj in ("q", "k", "v", "o"):
                shapes[p + f"self_attn.{proj}_proj.weight"] = (h, h)
            shapes[p + "mlp.gate_proj.weight"] = (i, h)
            shapes[p + "mlp.up_proj.weight"] = (i, h)
            shapes[p + "mlp.down_proj.weight"] = (h, i)
            shapes[p + "input_layernorm.weight"] = (h,)
            shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes["model.norm.weight"] = (h,)
        shapes["lm_head.weight"] = (self.vocab, h)
        return shapes

    @property
    def parameters(self) -> int:
        return sum(torch.Size(s).numel() for s in self.tensors().values())

    @property
    def bytes(self) -> int:
        return self.parameters * (2 if self.dtype == "bfloat16" else 4)

    @property
    def folder(self) -> Path:
        name = f"llama-{self.layers}x{self.hidden}-v{self.vocab}"
        if self.intermediate_size:
            name += f"-i{self.intermediate_size}"
        return ROOT / (name if self.dtype == "float32" else f"{name}-{self.dtype}")


def _weight(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if len(shape) == 1:
        return 1 + 0.05 * torch.randn(shape, generator=gen)
    decay = (1 + torch.arange(shape[1], dtype=torch.float32)) ** -0.5
    decay /= decay.square().mean().sqrt()
    return 0.02 * torch.randn(shape, generator=gen) * decay


def _finetune(w: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = w + 2e-4 * torch.randn(w.shape, generator=gen)
    if w.ndim == 2:
        b, a = torch.randn(w.shape[0], 4, generator=gen), torch.randn(4, w.shape[1], generator=gen)
        w += 1e-3 * (b @ a) / (w.shape[0] * w.shape[1]) ** 0.25
    return w


def generate(
    shape: Shape = Shape(), finetunes: int = 1, shard_tensors: int = 40, shard_bytes: int = 2 << 30
) -> dict[str, Path]:
    """Base and `finetunes` fine-tuned checkpoints: sharded safetensors folders with an index and a
    config. A shard holds at most `shard_tensors` tensors and `shard_bytes` bytes, and memory one
    shard: generation stays bounded whatever the model's size. A folder is complete once its
    index exists (written last)."""
    paths = {"base": shape.folder / "base", **{f"ft{i}": shape.folder / f"ft{i}" for i in range(finetunes)}}
    shapes = shape.tensors()
    names = list(shapes)
    dtype = getattr(torch, shape.dtype)
    size = 2 if shape.dtype == "bfloat16" else 4
    groups: list[list[int]] = [[]]
    for k, name in enumerate(names):
        full = (
            len(groups[-1]) >= shard_tensors
            or sum(torch.Size(shapes[names[j]]).numel() * size for j in groups[-1])
            + (torch.Size(shapes[name]).numel() * size)
            > shard_bytes
        )
        if groups[-1] and full:
            groups.append([])
        groups[-1].append(k)
    for key, path in paths.items():
        if (path / "model.safetensors.index.json").exists():
            continue
        path.mkdir(parents=True, exist_ok=True)
        weight_map = {}
        for s, group in enumerate(groups):
            shard = f"model-{s + 1:05d}-of-{len(groups):05d}.safetensors"
            tensors = {}
            for k in group:
                name = names[k]
                w = _weight(shapes[name], k)
                w = w if key == "base" else _finetune(w, 10_000 * (int(key[2:]) + 1) + k)
                tensors[name] = w.to(dtype)
                weight_map[name] = shard
            save_file(tensors, path / shard, metadata={"format": "pt"})
            del tensors
        (path / "config.json").write_text(json.dumps(shape.config(), indent=2))
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return paths
