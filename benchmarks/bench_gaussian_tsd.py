"""Time per 100M parameters of `weightlab gaussian --base` and `weightlab tsd`, with peak RSS.

python benchmarks/bench_gaussian_tsd.py             # Llama shape, ~271M parameters
python benchmarks/bench_gaussian_tsd.py --layers 4  # quick
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SCRATCH_JSON, bench_args, run_command, save_result
from generate import generate


def main() -> None:
    args = bench_args(__doc__, "gaussian_tsd")
    paths = generate(args.shape)
    n = args.shape.parameters
    result = {"parameters": n}
    for command, argv in (
        ("gaussian", ["gaussian", str(paths["ft0"]), "--base", str(paths["base"])]),
        ("tsd", ["tsd", str(paths["base"]), str(paths["ft0"])]),
    ):
        wall, rss, rss0 = run_command([*argv, "--json", SCRATCH_JSON, "--force", "--device", "cpu"])
        result[command] = {
            "wall_s": round(wall, 2),
            "s_per_100M_params": round(wall / (n / 1e8), 2),
            "peak_rss_mb": round(rss),
            "rss_after_imports_mb": round(rss0),
        }
    save_result(result, args.out)


if __name__ == "__main__":
    main()
