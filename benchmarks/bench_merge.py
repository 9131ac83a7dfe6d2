"""`weightlab merge` against mergekit and against the raw I/O it cannot avoid, in one run.

    python benchmarks/bench_merge.py              # Llama shape, ~271M parameters, 3 fine-tunes
    python benchmarks/bench_merge.py --layers 2   # quick

For task arithmetic and TIES (density 0.2) on the same base and three fine-tunes: wall time and
peak RSS of `weightlab merge` and of `mergekit-yaml CONFIG OUT --no-copy-tokenizer` (each in a
fresh process), the ratios ours/mergekit, our ratio to the raw cost (reading every tensor of
the four inputs and writing one checkpoint, with weightlab's reader and writer), and the largest
difference between the two tools' merged tensors. The issue's goals: TA ≤ 0.6× and TIES ≤ 0.35×
mergekit's wall, peak RSS ≤ 0.5× mergekit's, TIES ≤ 1.5× raw I/O.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_args, run_command, run_external, save_result
from generate import ROOT, generate

from weightlab.io import CheckpointWriter, open_checkpoint
from weightlab.io.safetensors_file import torch_dtype

METHODS = {
    "task-arithmetic": ("task_arithmetic", [], {"normalize": False}),
    "ties": ("ties", ["--density", "0.2"], {"density": 0.2, "normalize": True}),
}


def raw_io(paths: list[Path], out: Path) -> float:
    """Seconds to read every tensor of every input and write the first input's tensors back out,
    with the same reader and (planned) writer the merge uses."""
    ckpts = [open_checkpoint(p) for p in paths]
    plan = [(n, ckpts[0].info(n).shape, torch_dtype(ckpts[0].info(n).dtype, paths[0], n)) for n in ckpts[0].names()]
    start = time.perf_counter()
    with CheckpointWriter(out, force=True, plan=plan) as writer:
        for name in ckpts[0].names():
            tensors = [c.get(name) for c in ckpts]
            writer.add(name, tensors[0])
    return time.perf_counter() - start


def mergekit_config(method: str, base: Path, models: list[Path], params: dict) -> str:
    density = params.get("density")
    lines = [
        f"merge_method: {method}",
        f"base_model: {base}",
        "dtype: float32",
        f"parameters:\n  normalize: {str(params['normalize']).lower()}",
        "models:",
    ]
    for m in models:
        lines += [f"  - model: {m}", "    parameters:", "      weight: 1.0"]
        if density is not None:
            lines.append(f"      density: {density}")
    return "\n".join(lines) + "\n"


def largest_difference(ours: Path, theirs: Path) -> float:
    """max over tensors of ‖ours − theirs‖_∞ / ‖ours‖_∞."""
    a, b = open_checkpoint(ours), open_checkpoint(theirs)
    worst = 0.0
    for name in a.names():
        x, y = a.get(name, dtype=torch.float64), b.get(name, dtype=torch.float64)
        worst = max(worst, float((x - y).abs().max() / x.abs().max().clamp_min(1e-30)))
    return worst


def main() -> None:
    args = bench_args(__doc__, "merge")
    paths = generate(args.shape, finetunes=3)
    inputs = [paths["base"], paths["ft0"], paths["ft1"], paths["ft2"]]
    scratch = ROOT / "merge-out"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    largest = max(open_checkpoint(inputs[0]).info(n).nbytes for n in open_checkpoint(inputs[0]).names())
    result: dict = {"parameters": args.shape.parameters, "models": 3, "largest_tensor_mb": round(largest / 2**20)}
    raw = min(raw_io(inputs, scratch / "raw") for _ in range(2))  # the first pass also warms the page cache
    result["raw_read_all_write_one_s"] = round(raw, 2)
    mergekit_yaml = Path(sys.executable).parent / "mergekit-yaml"
    for method, (theirs, extra, params) in METHODS.items():
        ours = scratch / method
        wall, rss, rss0 = run_command(
            [
                "merge",
                "--method",
                method,
                "--base",
                str(inputs[0]),
                *map(str, inputs[1:]),
                *extra,
                "-o",
                str(ours),
                "--force",
                "--device",
                "cpu",
            ]
        )
        entry = {
            "wall_s": round(wall, 2),
            "peak_rss_mb": round(rss),
            "ratio_to_raw_io": round(wall / raw, 3),
            "rss_after_imports_mb": round(rss0),
        }
        if mergekit_yaml.exists():
            config = scratch / f"{method}.yml"
            config.write_text(mergekit_config(theirs, inputs[0], inputs[1:], params))
            mk_wall, mk_rss = run_external(
                [str(mergekit_yaml), str(config), str(scratch / f"mk-{method}"), "--no-copy-tokenizer"]
            )
            entry.update(
                mergekit_wall_s=round(mk_wall, 2),
                mergekit_peak_rss_mb=round(mk_rss),
                wall_ratio_to_mergekit=round(wall / mk_wall, 3),
                rss_ratio_to_mergekit=round(rss / mk_rss, 3),
                largest_relative_difference=largest_difference(ours, scratch / f"mk-{method}"),
            )
        else:
            entry["mergekit"] = "not installed: run benchmarks/setup.sh"
        result[method] = entry
    shutil.rmtree(scratch, ignore_errors=True)
    save_result(result, args.out)


if __name__ == "__main__":
    main()
