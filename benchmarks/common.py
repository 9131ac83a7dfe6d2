"""Shared by the benchmarks: run a weightlab command in a fresh process and measure it."""

from __future__ import annotations

import subprocess
import sys


def run_command(args: list[str]) -> tuple[float, float, float]:
    """Wall seconds, peak RSS and RSS after imports (MB) of `weightlab ARGS` in a fresh process."""
    code = ("import resource, sys, time; from weightlab.cli import main; import weightlab.report.plots\n"
            "rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024; t = time.perf_counter()\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, rss0)")
    out = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True).stdout
    wall, rss, rss0 = out.strip().splitlines()[-1].split()
    return float(wall), float(rss), float(rss0)

