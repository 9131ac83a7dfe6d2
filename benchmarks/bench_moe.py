"""Mixture-of-Experts (issue 38): what `experts` costs on a Qwen3-30B-A3B-shaped model, and what
`build-moe` costs against mergekit-moe on four 7B-shaped dense models, in one run.

    python benchmarks/bench_moe.py                 # 30B-A3B shapes (2 of 48 layers), 7B shapes (2 of 32)
    python benchmarks/bench_moe.py --quick         # small shapes, a minute

experts: a Qwen3-MoE with 30B-A3B's shapes (hidden 2048, 128 experts of 768, vocab 151936) and two
of its 48 layers, saved per expert as transformers saves it (bfloat16), and a fine-tune of it that
moved 16 experts per layer. Rows (each a fresh process, wall and peak RSS): reading every expert
matrix once as float32 (the floor), `experts MOE`, `experts FT --base MOE`. Per expert: wall over
layers × experts; the whole model: × 48 / 2 (every block costs the same).

build-moe: a Mixtral from four Llama-2-7B-shaped dense models (two layers, bfloat16), gate_mode
random (pure streaming) and hidden (the base runs the prompts), against `mergekit-moe` (0.1.5 in
.bench/env) on the same recipes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SCRATCH_JSON, run_command, run_external, run_python, save_result
from generate import ROOT, Shape, generate

MERGEKIT_MOE = ROOT / "env" / "bin" / "mergekit-moe"
TOKENIZER = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "moe" / "llama-base"  # word level, BOS
READ_EXPERTS = """
import re, time, torch
from weightlab.io import open_checkpoint
ckpt = open_checkpoint({path!r})
t = time.perf_counter()
for name in ckpt.names():
    if re.search(r"\\.experts\\.\\d+\\.", name):
        ckpt.get(name, dtype=torch.float32)
SECONDS = time.perf_counter() - t
"""


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Small shapes (a minute), to check the script.")
    parser.add_argument("--only", choices=("experts", "build-moe"), help="One part; the other's figures are kept.")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "moe.json")
    return parser.parse_args()


def qwen3_moe(folder: Path, layers: int, hidden: int, experts: int, inter: int, vocab: int, moved: Path) -> None:
    """A Qwen3-MoE saved per expert (bfloat16, seeded), and `moved`: it with 16 experts per layer changed."""
    from transformers import Qwen3MoeConfig

    if (folder / "model.safetensors.index.json").is_file() and (moved / "model.safetensors.index.json").is_file():
        return
    heads = max(1, hidden // 64)
    config = Qwen3MoeConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 8), head_dim=128 if hidden >= 2048 else 64, intermediate_size=3 * hidden,
        moe_intermediate_size=inter, num_experts=experts, num_experts_per_tok=min(8, experts),
        tie_word_embeddings=False, max_position_embeddings=4096,
    )  # fmt: skip
    raw = {**config.to_dict(), "architectures": ["Qwen3MoeForCausalLM"], "torch_dtype": "bfloat16"}
    gen = torch.Generator().manual_seed(0)
    head_dim = raw["head_dim"]

    def w(*shape: int) -> torch.Tensor:
        return (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)

    for target in (folder, moved):
        target.mkdir(parents=True, exist_ok=True)
        (target / "config.json").write_text(json.dumps(raw, indent=2))
    weight_map: dict[str, str] = {}

    def save(tensors: dict[str, torch.Tensor], target: Path, file: str) -> None:
        save_file(tensors, target / file)
        weight_map.update(dict.fromkeys(tensors, file))

    shared = {
        "model.embed_tokens.weight": w(vocab, hidden),
        "lm_head.weight": w(vocab, hidden),
        "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
    }
    for target in (folder, moved):
        save(shared, target, "model-shared.safetensors")
    del shared
    changed = torch.Generator().manual_seed(1)
    for layer in range(layers):
        p = f"model.layers.{layer}."
        tensors = {
            p + "self_attn.q_proj.weight": w(heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": w(raw["num_key_value_heads"] * head_dim, hidden),
            p + "self_attn.v_proj.weight": w(raw["num_key_value_heads"] * head_dim, hidden),
            p + "self_attn.o_proj.weight": w(hidden, heads * head_dim),
            p + "self_attn.q_norm.weight": torch.ones(head_dim, dtype=torch.bfloat16),
            p + "self_attn.k_norm.weight": torch.ones(head_dim, dtype=torch.bfloat16),
            p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
            p + "mlp.gate.weight": w(experts, hidden),
        }
        for e in range(experts):
            for part, shape in (
                ("gate_proj", (inter, hidden)),
                ("up_proj", (inter, hidden)),
                ("down_proj", (hidden, inter)),
            ):
                tensors[p + f"mlp.experts.{e}.{part}.weight"] = w(*shape)
        save(tensors, folder, f"model-layer{layer}.safetensors")
        for e in range(min(16, experts)):
            name = p + f"mlp.experts.{e * max(1, experts // 16)}.down_proj.weight"
            change = torch.randn(tensors[name].shape, generator=changed) * 0.002
            tensors[name] = tensors[name] + change.to(torch.bfloat16)
        save(tensors, moved, f"model-layer{layer}.safetensors")
        del tensors
    for target in (folder, moved):  # written last: a folder is complete once it has its index
        (target / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def bench_experts(quick: bool) -> dict:
    layers, hidden, experts, inter, vocab = (2, 256, 16, 128, 4096) if quick else (2, 2048, 128, 768, 151936)
    name = f"qwen3moe-{layers}x{hidden}-e{experts}-i{inter}-v{vocab}"
    base, moved = ROOT / name / "base", ROOT / name / "ft"
    qwen3_moe(base, layers, hidden, experts, inter, vocab, moved)
    expert_bytes = layers * experts * 3 * inter * hidden * 2
    read, read_rss, _ = run_python(READ_EXPERTS.format(path=str(base)))
    alone = run_command(["experts", str(base), "--json", SCRATCH_JSON, "--force"])
    with_base = run_command(["experts", str(moved), "--base", str(base), "--json", SCRATCH_JSON, "--force"])
    per_part_f32 = experts * inter * hidden * 4 / 2**20
    rows = {}
    for label, (wall, rss, rss0) in (("experts MOE", alone), ("experts FT --base MOE", with_base)):
        rows[label] = {
            "wall_s": round(wall, 2),
            "peak_rss_mb": round(rss),
            "rss_after_imports_mb": round(rss0),
            "x_read": round(wall / read, 2),
            "ms_per_expert": round(1000 * wall / (layers * experts), 2),
            "whole_model_estimate_min": round(wall * 48 / layers / 60, 1),
        }
    return {
        "shape": {
            "layers": layers,
            "of_layers": 48,
            "hidden": hidden,
            "experts": experts,
            "moe_intermediate": inter,
            "vocab": vocab,
            "expert_gb_bf16": round(expert_bytes / 1e9, 2),
        },
        "read_experts_float32": {"wall_s": round(read, 2), "peak_rss_mb": round(read_rss)},
        "one_part_of_a_block_float32_mb": round(per_part_f32),
        **rows,
    }


def bench_build(quick: bool) -> dict:
    shape = Shape(2, 256, 4096, 688, "bfloat16") if quick else Shape(2, 4096, 32000, 11008, "bfloat16")
    folder = generate(shape, finetunes=3)["base"].parent
    if not (folder / "base" / "tokenizer.json").is_file():
        for f in TOKENIZER.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")):
                shutil.copy(f, folder / "base" / f.name)
    out: dict = {
        "shape": {
            "layers": shape.layers,
            "hidden": shape.hidden,
            "intermediate": shape.intermediate,
            "model_gb": round(shape.bytes / 1e9, 2),
        }
    }
    for mode in ("random", "hidden"):
        recipe = {
            "base_model": str(folder / "base"),
            "gate_mode": mode,
            "dtype": "bfloat16",
            "experts": [
                {"source_model": str(folder / m), "positive_prompts": [f"w{i} w{i + 7} w{3 * i}", f"w{i + 20} w9"]}
                for i, m in enumerate(("ft0", "ft1", "ft2", "base"))
            ],
        }
        path = folder / f"moe-{mode}.yml"
        path.write_text(json.dumps(recipe))
        ours_dir, theirs_dir = folder / f"moe-{mode}-weightlab", folder / f"moe-{mode}-mergekit"
        wall, rss, rss0 = run_command(["build-moe", str(path), "-o", str(ours_dir), "--force"])
        shutil.rmtree(theirs_dir, ignore_errors=True)
        m_wall, m_rss = run_external([str(MERGEKIT_MOE), str(path), str(theirs_dir), "--device", "cpu"])
        out[f"gate_mode {mode}"] = {
            "weightlab": {"wall_s": round(wall, 2), "peak_rss_mb": round(rss), "rss_after_imports_mb": round(rss0)},
            "mergekit-moe": {"wall_s": round(m_wall, 2), "peak_rss_mb": round(m_rss)},
            "wall_x_mergekit": round(wall / m_wall, 3),
            "rss_x_mergekit": round(rss / m_rss, 3),
        }
        shutil.rmtree(ours_dir, ignore_errors=True)
        shutil.rmtree(theirs_dir, ignore_errors=True)
    return out


def main() -> None:
    args = arguments()
    result = json.loads(args.out.read_text()) if args.only and args.out.is_file() else {}
    if args.only in (None, "experts"):
        result["experts"] = bench_experts(args.quick)
    if args.only in (None, "build-moe"):
        result["build-moe"] = bench_build(args.quick)
    save_result(result, args.out)


if __name__ == "__main__":
    main()
