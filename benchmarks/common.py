"""Shared by the benchmarks: run a weightlab command in a fresh process and measure it."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


# A throwaway result file: the output planner refuses /dev/null (not a regular file).
SCRATCH_JSON = str(Path(tempfile.gettempdir()) / "weightlab-bench-result.json")


def run_command(args: list[str]) -> tuple[float, float, float]:
    """Wall seconds, peak RSS and RSS after imports (MB) of `weightlab ARGS` in a fresh process."""
    # VmHWM (the peak resident set of this address space) starts afresh at exec, unlike
    # ru_maxrss, which a child inherits from the parent that forked it.
    code = ("import sys, time; from weightlab.cli import main; import weightlab.report.plots\n"
            "hwm = lambda: int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) / 1024\n"
            "rss0 = hwm(); t = time.perf_counter()\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print(time.perf_counter() - t, hwm(), rss0)")
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"weightlab {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    wall, rss, rss0 = done.stdout.strip().splitlines()[-1].split()
    return float(wall), float(rss), float(rss0)



def bench_args(doc: str, result_name: str, **extra: int) -> argparse.Namespace:
    """The options every benchmark takes: the model shape and where the result JSON goes."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=1024)
    for name, default in extra.items():
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / f"{result_name}.json")
    return parser.parse_args()


def save_result(result: dict, path: Path) -> None:
    """Write the result JSON and print it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
