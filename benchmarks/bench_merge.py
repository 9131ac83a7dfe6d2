"""Benchmark `weightlab merge` against the raw I/O it cannot avoid (and mergekit, if importable).

    python benchmarks/bench_merge.py              # BERT-large shape, ~334M parameters, 3 fine-tunes
    python benchmarks/bench_merge.py --layers 4   # quick

Raw cost: reading every tensor of the base and the three fine-tunes and writing one checkpoint
of the same size, with weightlab's own reader and writer. Reported in one run: wall time and
peak RSS of task-arithmetic and TIES merges, their ratio to the raw cost, and the peak RSS
over the largest tensor.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_args, run_command, save_result  # noqa: E402
from generate import ROOT, generate, parameters  # noqa: E402

from weightlab.io import CheckpointWriter, open_checkpoint  # noqa: E402
from weightlab.io.safetensors_file import torch_dtype  # noqa: E402


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


def main() -> None:
    args = bench_args(__doc__, "merge")
    paths = generate(args.layers, args.hidden, finetunes=3)
    inputs = [paths["base"], paths["ft0"], paths["ft1"], paths["ft2"]]
    scratch = ROOT / "merge-out"
    largest = max(open_checkpoint(inputs[0]).info(n).nbytes for n in open_checkpoint(inputs[0]).names())
    result = {"parameters": parameters(args.layers, args.hidden), "models": 3,
              "largest_tensor_mb": round(largest / 2**20)}
    raw = min(raw_io(inputs, scratch / "raw") for _ in range(2))  # the first pass also warms the page cache
    result["raw_read_all_write_one_s"] = round(raw, 2)
    for method, extra in (("task-arithmetic", []), ("ties", ["--density", "0.3"])):
        wall, rss, rss0 = run_command(["merge", "--method", method, "--base", str(inputs[0]), *map(str, inputs[1:]),
                                       *extra, "-o", str(scratch / method), "--force", "--device", "cpu"])
        result[method] = {"wall_s": round(wall, 2), "ratio_to_raw_io": round(wall / raw, 3), "peak_rss_mb": round(rss),
                          "rss_after_imports_mb": round(rss0),
                          "work_rss_over_largest_tensor": round((rss - rss0) * 2**20 / largest, 2)}
    try:
        import mergekit  # noqa: F401

        result["mergekit"] = "importable, but this benchmark does not drive it yet"
    except ImportError:
        result["mergekit"] = None
    shutil.rmtree(scratch, ignore_errors=True)
    save_result(result, args.out)


if __name__ == "__main__":
    main()
