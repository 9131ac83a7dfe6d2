"""Generate large BERT-shaped checkpoints for benchmarks (cached under .bench/).

Defaults give a BERT-large shape: 24 layers, hidden 1024, intermediate 4096, vocab 30522,
about 334M parameters (1.3 GB in float32). A fine-tune is the base plus a small dense update
and a stronger low-rank one, written tensor by tensor so generation itself stays bounded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent / ".bench"


def bert_shapes(layers: int, hidden: int, vocab: int = 30522) -> dict[str, tuple[int, ...]]:
    inter = 4 * hidden
    shapes = {"embeddings.word_embeddings.weight": (vocab, hidden),
              "embeddings.position_embeddings.weight": (512, hidden),
              "embeddings.LayerNorm.weight": (hidden,)}
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for n in ("query", "key", "value"):
            shapes[p + f"attention.self.{n}.weight"] = (hidden, hidden)
            shapes[p + f"attention.self.{n}.bias"] = (hidden,)
        shapes[p + "attention.output.dense.weight"] = (hidden, hidden)
        shapes[p + "intermediate.dense.weight"] = (inter, hidden)
        shapes[p + "output.dense.weight"] = (hidden, inter)
        shapes[p + "output.LayerNorm.weight"] = (hidden,)
    return shapes


def generate(layers: int = 24, hidden: int = 1024, finetunes: int = 1, shard_tensors: int = 40) -> dict[str, Path]:
    """Base and `finetunes` fine-tuned checkpoints, sharded safetensors folders with an index."""
    folder = ROOT / f"bert-{layers}x{hidden}"
    paths = {"base": folder / "base", **{f"ft{i}": folder / f"ft{i}" for i in range(finetunes)}}
    if all((p / "model.safetensors.index.json").exists() for p in paths.values()):
        return paths
    shapes = bert_shapes(layers, hidden)
    names = list(shapes)
    for key, path in paths.items():
        path.mkdir(parents=True, exist_ok=True)
        weight_map = {}
        for s, start in enumerate(range(0, len(names), shard_tensors)):
            shard = f"model-{s + 1:05d}.safetensors"
            tensors = {}
            for j, name in enumerate(names[start:start + shard_tensors]):
                gen = torch.Generator().manual_seed(start + j)
                w = torch.randn(shapes[name], generator=gen) * 0.02
                if key != "base":
                    ft_gen = torch.Generator().manual_seed(10_000 * (int(key[2:]) + 1) + start + j)
                    w += 2e-4 * torch.randn(shapes[name], generator=ft_gen)
                    if w.ndim == 2:
                        b = torch.randn(w.shape[0], 4, generator=ft_gen)
                        a = torch.randn(4, w.shape[1], generator=ft_gen)
                        w += 1e-3 * (b @ a) / (w.shape[0] * w.shape[1]) ** 0.25
                tensors[name] = w
                weight_map[name] = shard
            save_file(tensors, path / shard)
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        (path / "config.json").write_text(json.dumps({"model_type": "bert", "num_hidden_layers": layers,
                                                      "hidden_size": hidden, "intermediate_size": 4 * hidden}))
    return paths


def parameters(layers: int = 24, hidden: int = 1024) -> int:
    total = 0
    for shape in bert_shapes(layers, hidden).values():
        n = 1
        for d in shape:
            n *= d
        total += n
    return total
