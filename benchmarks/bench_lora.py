"""Benchmark `weightlab init-lora` (PiSSA, all linear layers) with exact vs randomized SVD.

    python benchmarks/bench_lora.py               # BERT-large shape, ~334M parameters
    python benchmarks/bench_lora.py --layers 4    # quick

Reports in one run: wall time of each, and the reconstruction error each gives — the mean over
modules of ‖W − s·BA‖_F/‖W‖_F (exact is the Eckart–Young optimum; randomized pays a little).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_command  # noqa: E402
from generate import ROOT, generate, parameters  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "lora.json")
    args = parser.parse_args()
    base = generate(args.layers, args.hidden)["base"]
    scratch = ROOT / "lora-out"
    result = {"parameters": parameters(args.layers, args.hidden), "rank": args.rank}
    for svd in ("exact", "randomized"):
        out = scratch / svd
        wall, rss, _ = run_command(["init-lora", str(base), "--rank", str(args.rank), "--svd", svd, "-o", str(out),
                                    "--no-residual", "--force", "--device", "cpu"])
        modules = json.loads((out / "weightlab_lora.json").read_text())["modules"]
        result[svd] = {"wall_s": round(wall, 2), "modules": len(modules), "peak_rss_mb": round(rss),
                       "mean_relative_error": sum(m["relative_error"] for m in modules) / len(modules),
                       "max_relative_error": max(m["relative_error"] for m in modules)}
    result["speedup_randomized"] = round(result["exact"]["wall_s"] / result["randomized"]["wall_s"], 2)
    result["error_increase_randomized"] = result["randomized"]["mean_relative_error"] - result["exact"]["mean_relative_error"]
    shutil.rmtree(scratch, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
