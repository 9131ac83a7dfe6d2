"""Benchmark `weightlab init-lora` (PiSSA, all linear layers) with exact vs randomized SVD.

    python benchmarks/bench_lora.py               # Llama shape, ~271M parameters
    python benchmarks/bench_lora.py --layers 4    # quick

Reports in one run: wall time of each, and the reconstruction error each gives — the mean over
modules of ‖W − s·BA‖_F/‖W‖_F (exact is the Eckart–Young optimum; randomized pays a little).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_args, run_command, save_result
from generate import ROOT, generate


def main() -> None:
    args = bench_args(__doc__, "lora", rank=16)
    base = generate(args.shape)["base"]
    scratch = ROOT / "lora-out"
    result = {"parameters": args.shape.parameters, "rank": args.rank}
    for svd in ("exact", "randomized"):
        out = scratch / svd
        wall, rss, _ = run_command(
            [
                "init-lora",
                str(base),
                "--rank",
                str(args.rank),
                "--svd",
                svd,
                "-o",
                str(out),
                "--no-residual",
                "--force",
                "--device",
                "cpu",
            ]
        )
        modules = json.loads((out / "weightlab_lora.json").read_text())["modules"]
        result[svd] = {
            "wall_s": round(wall, 2),
            "modules": len(modules),
            "peak_rss_mb": round(rss),
            "mean_relative_error": sum(m["relative_error"] for m in modules) / len(modules),
            "max_relative_error": max(m["relative_error"] for m in modules),
        }
    result["speedup_randomized"] = round(result["exact"]["wall_s"] / result["randomized"]["wall_s"], 2)
    result["error_increase_randomized"] = (
        result["randomized"]["mean_relative_error"] - result["exact"]["mean_relative_error"]
    )
    shutil.rmtree(scratch, ignore_errors=True)
    save_result(result, args.out)


if __name__ == "__main__":
    main()
