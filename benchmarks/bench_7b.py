"""Real LLM sizes on one ordinary box: a Llama-2-7B-shaped base and three fine-tunes in bfloat16,
merged and analysed by weightlab and merged by mergekit, each run in a fresh process with its
wall time and peak RSS, and every figure as a ratio to mergekit and to our raw I/O.

    python benchmarks/bench_7b.py                       # 32 × 4096, intermediate 11008: ≈ 6.7B, 13.5 GB each
    python benchmarks/bench_7b.py --layers 2 --hidden 512 --intermediate 1376 --vocab 4096   # the plumbing, quick
    benchmarks/run_all.sh --large                       # the same, after every other benchmark
    python benchmarks/bench_7b.py --device cuda --only costs spectrum --out benchmarks/results/7b-cuda.json

With `--only` rows that read the base and one fine-tune alone (spectrum, esd, costs), only those two
models are generated: 27 GB, which fits a GPU machine's 64 GB disk where four models do not.

The checkpoints are generated seeded, one shard at a time (generate.py: a decaying spectrum per
matrix; a fine-tune adds dense noise and a low-rank update), and kept under .bench/ between runs.
Free disk is checked first: four models, plus room for one output at a time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import METHODS as MERGEKIT_METHODS
from bench_merge import mergekit_config
from common import run_command, run_external, run_python, save_result
from generate import ROOT, Shape, generate

from weightlab.io.atomic import free_bytes

OURS = {
    "task-arithmetic": [],
    "ties": ["--density", "0.2"],
    "iso-c": [],
    "iso-cts": [],
}
RAW_IO = """
import sys
from pathlib import Path
sys.path.insert(0, {bench!r})
from bench_merge import raw_io
SECONDS = raw_io([Path(p) for p in {paths!r}], Path({out!r}))
"""  # bench_merge.raw_io in a fresh process: its peak RSS is the raw cost's own
COSTS = """
import time
import torch
from weightlab.compute.gram import decompose, singular_values
from weightlab.compute.svd import full_svd
torch.manual_seed(0)
device = torch.device({device!r})
settle = torch.cuda.synchronize if device.type == "cuda" else lambda: None
COSTS = {{}}
for rows, cols in {shapes!r}:
    w = (torch.randn(rows, cols) * 0.02).to(device)
    for name, fn in [
        ("singular values (Gram, syevd)", singular_values),
        ("values and all vectors (Gram, syevd)", decompose),
        ("float32 SVD with vectors (LAPACK gesdd)", full_svd),
    ]:
        fn(w[:64])  # libraries loaded
        settle()
        t = time.perf_counter()
        fn(w)
        settle()
        COSTS[f"{{name}} {{rows}}x{{cols}}"] = round(1000 * (time.perf_counter() - t))
SECONDS = 0
"""  # milliseconds per matrix of each decomposition the analyses and the SVD merges run
TWO_MODEL_ROWS = {"costs", "spectrum", "esd"}  # rows that read the base and ft0 alone


def frankenmerge(base: str, other: str, layers: int) -> str:
    """A mergekit passthrough recipe stacking the base's first three quarters on the fine-tune's last
    three quarters: 48 layers from two 32-layer models, the shape of the popular 10.7B/11B stacks."""
    cut = 3 * layers // 4
    return (
        "merge_method: passthrough\ndtype: bfloat16\nslices:\n"
        f"  - sources:\n      - model: {base}\n        layer_range: [0, {cut}]\n"
        f"  - sources:\n      - model: {other}\n        layer_range: [{layers - cut}, {layers}]\n"
    )


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument(
        "--only", nargs="*", help="Run these rows only (raw, merge:METHOD, mergekit:METHOD, spectrum, …)."
    )
    parser.add_argument(
        "--device", help="Pass --device to weightlab's commands (cuda, cuda:1, cpu) and --cuda to mergekit's."
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "7b.json")
    return parser.parse_args()


def require_disk(shape: Shape, finetunes: int) -> None:
    """The base and `finetunes` fine-tunes (unless already generated) and one output, or one clear
    line and exit 2."""
    models = ["base", *(f"ft{i}" for i in range(finetunes))]
    missing = sum(not (shape.folder / k / "model.safetensors.index.json").exists() for k in models)
    needed = (missing + 1.1) * shape.bytes
    free = free_bytes(ROOT)
    if needed > free:
        sys.exit(
            f"error: this benchmark needs {needed / 1e9:.1f} GB free under {ROOT} "
            f"({missing} models to generate at {shape.bytes / 1e9:.1f} GB each, and one output); "
            f"{free / 1e9:.1f} GB are free"
        )


def main() -> None:
    args = arguments()
    shape = Shape(args.layers, args.hidden, args.vocab, args.intermediate, "bfloat16")
    finetunes = 1 if args.only and {row.split(" ")[0] for row in args.only} <= TWO_MODEL_ROWS else 3
    require_disk(shape, finetunes)
    started = time.perf_counter()
    paths = generate(shape, finetunes=finetunes)
    inputs = [str(p) for p in paths.values()]
    on_device = ["--device", args.device] if args.device else []
    scratch = ROOT / f"{shape.folder.name}-out"  # per shape: runs of two shapes may overlap
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    wanted = lambda row: not args.only or row in args.only
    previous = json.loads(args.out.read_text()) if args.only and args.out.is_file() else {}
    result: dict = {
        "parameters": shape.parameters,
        "gb_per_model": round(shape.bytes / 1e9, 2),
        "shape": {
            "layers": shape.layers,
            "hidden": shape.hidden,
            "intermediate": shape.intermediate,
            "vocab": shape.vocab,
        },
        "generation_s": round(time.perf_counter() - started, 1),
        "rows": dict(previous.get("rows", {})),
        **{key: previous[key] for key in ("matrix_costs_ms",) if key in previous},
    }
    rows = result["rows"]

    run = time.strftime("%Y-%m-%d %H:%M")  # rows kept from earlier runs keep theirs

    def done(row: str, entry: dict) -> None:
        if row != "raw" and rows.get("raw", {}).get("run") == run:
            entry["raw_io_s"] = rows["raw"]["wall_s"]  # ratios to raw I/O are within one run
        rows[row] = {**entry, "run": run, **({"device": args.device} if args.device else {})}
        print(row, json.dumps(entry), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")  # what is done so far survives an interruption

    if wanted("costs"):
        _, _, values = run_python(
            COSTS.format(
                shapes=[(shape.hidden, shape.hidden), (shape.intermediate, shape.hidden)], device=args.device or "cpu"
            ),
            ["COSTS"],
        )
        result["matrix_costs_ms"] = values["COSTS"]
        print("matrix costs (ms):", json.dumps(values["COSTS"]), flush=True)
    if wanted("raw"):
        seconds, rss, _ = run_python(
            RAW_IO.format(bench=str(Path(__file__).resolve().parent), paths=inputs, out=str(scratch / "raw"))
        )
        done("raw", {"wall_s": round(seconds, 1), "peak_rss_mb": round(rss)})
        shutil.rmtree(scratch / "raw", ignore_errors=True)
    mergekit_yaml = Path(sys.executable).parent / "mergekit-yaml"
    for method, extra in OURS.items():
        if wanted(f"merge:{method}"):
            out = scratch / method
            command = ["merge", "--method", method, "--base", inputs[0], *inputs[1:], *extra, *on_device]
            wall, rss, _ = run_command([*command, "-o", str(out), "--force"])
            done(f"merge:{method}", {"wall_s": round(wall, 1), "peak_rss_mb": round(rss)})
            shutil.rmtree(out, ignore_errors=True)
        if method in MERGEKIT_METHODS and wanted(f"mergekit:{method}") and mergekit_yaml.exists():
            theirs, _, params = MERGEKIT_METHODS[method]
            config = scratch / f"{method}.yml"
            config.write_text(
                mergekit_config(theirs, Path(inputs[0]), [Path(p) for p in inputs[1:]], params).replace(
                    "dtype: float32", "dtype: bfloat16"
                )
            )
            out = scratch / f"mk-{method}"
            wall, rss = run_external(
                [
                    str(mergekit_yaml),
                    str(config),
                    str(out),
                    "--no-copy-tokenizer",
                    "--lazy-unpickle",
                    "--low-cpu-memory",
                    *(["--cuda"] if args.device and args.device.startswith("cuda") else []),
                ]
            )
            done(f"mergekit:{method}", {"wall_s": round(wall, 1), "peak_rss_mb": round(rss)})
            shutil.rmtree(out, ignore_errors=True)
    recipe = scratch / "frankenmerge.yml"
    recipe.write_text(frankenmerge(inputs[0], inputs[1], shape.layers))
    if wanted("merge:frankenmerge"):
        out = scratch / "frankenmerge"
        wall, rss, _ = run_command(["merge", "--config", str(recipe), *on_device, "-o", str(out), "--force"])
        done("merge:frankenmerge", {"wall_s": round(wall, 1), "peak_rss_mb": round(rss)})
        shutil.rmtree(out, ignore_errors=True)
    if wanted("mergekit:frankenmerge") and mergekit_yaml.exists():
        out = scratch / "mk-frankenmerge"
        wall, rss = run_external(
            [str(mergekit_yaml), str(recipe), str(out), "--no-copy-tokenizer", "--lazy-unpickle", "--low-cpu-memory"]
        )
        done("mergekit:frankenmerge", {"wall_s": round(wall, 1), "peak_rss_mb": round(rss)})
        shutil.rmtree(out, ignore_errors=True)
    cache = scratch / "cache"
    analyses = {
        "spectrum (cold cache)": ["spectrum", inputs[0], inputs[1], "--cache-dir", str(cache)],
        "spectrum (warm cache)": ["spectrum", inputs[0], inputs[1], "--cache-dir", str(cache)],
        "esd": ["esd", inputs[1]],
        "compare": ["compare", "--base", inputs[0], *inputs[1:]],
    }
    for row, command in analyses.items():
        if wanted(row.split(" ")[0]):
            wall, rss, _ = run_command([*command, *on_device, "--json", str(scratch / "r.json"), "--force"])
            done(row, {"wall_s": round(wall, 1), "peak_rss_mb": round(rss)})
    shutil.rmtree(scratch, ignore_errors=True)
    for row, entry in rows.items():
        if "raw_io_s" in entry:
            entry["ratio_to_raw_io"] = round(entry["wall_s"] / entry["raw_io_s"], 2)
        if row.startswith("merge:") and f"mergekit:{row[6:]}" in rows:
            theirs = rows[f"mergekit:{row[6:]}"]
            entry["wall_ratio_to_mergekit"] = round(entry["wall_s"] / theirs["wall_s"], 3)
            entry["rss_ratio_to_mergekit"] = round(entry["peak_rss_mb"] / theirs["peak_rss_mb"], 3)
    save_result(result, args.out)
    print(table(result))


def table(result: dict) -> str:
    lines = [
        "| run | wall s | peak RSS MB | × raw I/O | wall × mergekit | RSS × mergekit |",
        "|---|---|---|---|---|---|",
    ]
    for row, e in result["rows"].items():
        lines.append(
            f"| {row} | {e['wall_s']} | {e['peak_rss_mb']} | {e.get('ratio_to_raw_io', '—')} | "
            f"{e.get('wall_ratio_to_mergekit', '—')} | {e.get('rss_ratio_to_mergekit', '—')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
