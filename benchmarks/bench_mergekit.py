"""Every mergekit recipe beside mergekit 0.1.5 itself: the same YAML run by `mergekit-yaml` (or
`mergekit-multi`) and by `weightlab merge --config`, on a generated Llama-shaped base and three
fine-tunes, in one run.

    python benchmarks/bench_mergekit.py                               # ~271M parameters, 16 layers
    python benchmarks/bench_mergekit.py --layers 4 --hidden 256 --vocab 4096   # quick

Recipes: mergekit's own `examples/*.yml` (model paths and layer ranges scaled to the generated
models) and one recipe per merge method. Per recipe: the largest relative difference between the
two outputs (max over tensors of ‖ours − theirs‖_∞ / ‖ours‖_∞; for random drops at density < 1,
the relative difference of the L1 norms of the merged task vectors instead, marked "random"),
both tools' wall time and peak RSS, and their ratios. Results in `results/mergekit.json`.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import largest_difference
from common import bench_args, run_command, run_external, save_result
from generate import ROOT, generate

from weightlab.io import open_checkpoint


def models(*entries: tuple[str, dict]) -> list[dict]:
    return [{"model": m, **({"parameters": params} if params else {})} for m, params in entries]


def recipes(p: dict[str, str], layers: int) -> dict[str, list[dict]]:
    """name -> the recipe's YAML documents (several for mergekit-multi)."""
    a, b, c, base = p["ft0"], p["ft1"], p["ft2"], p["base"]
    half = layers // 2
    mlp_only = [{"filter": "mlp", "value": 0.5}, {"value": 0}]
    t_filters = [
        {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
        {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
        {"value": 0.5},
    ]
    pair = {"weight": 0.5, "density": 0.5}
    crumbs = {"weight": 0.5, "density": 0.8, "gamma": 0.02}
    della = {"weight": 0.5, "density": 0.5, "epsilon": 0.1}
    one = {
        "examples/linear": {
            "merge_method": "linear",
            "models": models((a, {"weight": 1.0}), (b, {"weight": 0.3}), (c, {"weight": 0.5})),
        },
        "examples/ties": {
            "merge_method": "ties",
            "base_model": base,
            "parameters": {"normalize": True, "int8_mask": True},
            "models": models(
                (a, {"density": [1, 0.7, 0.1], "weight": 1.0}),
                (b, {"density": 0.5, "weight": [0, 0.3, 0.7, 1]}),
                (c, {"density": 0.33, "weight": mlp_only}),
            ),
        },
        "examples/bio-merge": {
            "merge_method": "ties",
            "base_model": base,
            "parameters": {"normalize": False, "int8_mask": True},
            "models": models((a, pair), (b, pair)),
        },
        "examples/gradient-slerp": {
            "merge_method": "slerp",
            "base_model": a,
            "slices": [{"sources": [{"model": m, "layer_range": [0, layers]} for m in (a, b)]}],
            "parameters": {"t": t_filters},
        },
        "examples/orcamini-platy-44layer": {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": a, "layer_range": [0, half + 1]}]},
                {"sources": [{"model": b, "layer_range": [half - 1, layers]}]},
            ],
        },
        "examples/arcee_fusion": {"merge_method": "arcee_fusion", "base_model": a, "models": models((a, {}), (b, {}))},
        "task_arithmetic": {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "parameters": {"lambda": 0.8},
            "models": models((a, {"weight": 0.7}), (b, {"weight": 0.4})),
        },
        "dare_ties": {"merge_method": "dare_ties", "base_model": base, "models": models((a, pair), (b, pair))},
        "dare_linear": {"merge_method": "dare_linear", "base_model": base, "models": models((a, pair), (b, pair))},
        "breadcrumbs": {"merge_method": "breadcrumbs", "base_model": base, "models": models((a, crumbs), (b, crumbs))},
        "breadcrumbs_ties": {
            "merge_method": "breadcrumbs_ties",
            "base_model": base,
            "models": models((a, crumbs), (b, crumbs)),
        },
        "della": {"merge_method": "della", "base_model": base, "models": models((a, della), (b, della))},
        "della_linear": {"merge_method": "della_linear", "base_model": base, "models": models((a, della), (b, della))},
        "nuslerp": {
            "merge_method": "nuslerp",
            "base_model": base,
            "parameters": {"nuslerp_flatten": False},
            "models": models((a, {"weight": 0.3}), (b, {"weight": 0.7})),
        },
        "multislerp": {
            "merge_method": "multislerp",
            "base_model": base,
            "models": models((a, {"weight": 0.3}), (b, {"weight": 0.7})),
        },
        "karcher": {"merge_method": "karcher", "models": models((a, {}), (b, {}), (c, {}))},
        "model_stock": {"merge_method": "model_stock", "base_model": base, "models": models((a, {}), (b, {}), (c, {}))},
        "sce": {
            "merge_method": "sce",
            "base_model": base,
            "parameters": {"select_topk": 0.5},
            "models": models((a, {}), (b, {}), (c, {})),
        },
        "ram": {"merge_method": "ram", "base_model": base, "models": models((a, {}), (b, {}))},
        "ramplus_tl": {"merge_method": "ramplus_tl", "base_model": base, "models": models((a, {}), (b, {}))},
        "nearswap": {
            "merge_method": "nearswap",
            "base_model": base,
            "parameters": {"t": 0.001},
            "models": models((a, {})),
        },
    }
    out = {name: [{**r, "dtype": "float32"}] for name, r in one.items()}
    out["mergekit-multi"] = [
        {
            "name": "first",
            "merge_method": "ties",
            "base_model": base,
            "dtype": "float32",
            "models": models((a, pair), (b, pair)),
        },
        {
            "merge_method": "slerp",
            "base_model": c,
            "parameters": {"t": 0.3},
            "dtype": "float32",
            "models": models((c, {}), ("first", {})),
        },
    ]
    return out


def l1_difference(ours: Path, theirs: Path, base: str) -> float:
    """Relative difference of the merged task vectors' L1 norms (random drops cannot match entrywise)."""
    a, b, w = open_checkpoint(ours), open_checkpoint(theirs), open_checkpoint(base)
    x = y = 0.0
    for name in a.names():
        w0 = w.get(name, dtype=torch.float64)
        x += float((a.get(name, dtype=torch.float64) - w0).abs().sum())
        y += float((b.get(name, dtype=torch.float64) - w0).abs().sum())
    return abs(x - y) / max(x, 1e-30)


def main() -> None:
    args = bench_args(__doc__, "mergekit")
    paths = {k: str(v) for k, v in generate(args.shape, finetunes=3).items()}
    scratch = ROOT / "mergekit-out"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "mergekit-yaml").exists():
        raise SystemExit("mergekit is not installed here: run benchmarks/setup.sh and use .bench/env/bin/python")
    result: dict = {"parameters": args.shape.parameters, "layers": args.shape.layers, "recipes": {}}
    rows = [
        "| recipe | largest difference | ours s | mergekit s | wall × mergekit | RSS × mergekit |",
        "|---|---|---|---|---|---|",
    ]
    for name, docs in recipes(paths, args.shape.layers).items():
        key = name.replace("/", "-")
        recipe = scratch / f"{key}.yml"
        recipe.write_text(yaml.safe_dump_all(docs, sort_keys=False))
        ours, theirs = scratch / f"ours-{key}", scratch / f"mk-{key}"
        wall, rss, _ = run_command(["merge", "--config", str(recipe), "-o", str(ours), "--device", "cpu"])
        if len(docs) > 1:
            command = [
                str(bin_dir / "mergekit-multi"),
                str(recipe),
                "--out-path",
                str(theirs),
                "-I",
                str(scratch / f"mk-{key}-stages"),
            ]
        else:
            command = [str(bin_dir / "mergekit-yaml"), str(recipe), str(theirs)]
        mk_wall, mk_rss = run_external([*command, "--no-copy-tokenizer"])
        random = name in ("dare_ties", "dare_linear", "della", "della_linear")
        difference = l1_difference(ours, theirs, paths["base"]) if random else largest_difference(ours, theirs)
        entry = {
            "largest_relative_difference": difference,
            "random": random,
            "wall_s": round(wall, 2),
            "peak_rss_mb": round(rss),
            "mergekit_wall_s": round(mk_wall, 2),
            "mergekit_peak_rss_mb": round(mk_rss),
            "wall_ratio_to_mergekit": round(wall / mk_wall, 3),
            "rss_ratio_to_mergekit": round(rss / mk_rss, 3),
        }
        result["recipes"][name] = entry
        shown = f"{difference:.1e}" + (" (L1 of τ, random)" if random else "")
        rows.append(f"| {name} | {shown} | {wall:.1f} | {mk_wall:.1f} | {wall / mk_wall:.2f} | {rss / mk_rss:.2f} |")
        shutil.rmtree(ours, ignore_errors=True)
        shutil.rmtree(theirs, ignore_errors=True)
    print("\n".join(rows))
    result["table"] = rows
    shutil.rmtree(scratch, ignore_errors=True)
    save_result(result, args.out)


if __name__ == "__main__":
    main()
