"""Shared by the benchmarks: run a weightlab command in a fresh process and measure it."""

from __future__ import annotations

import subprocess
import sys


def run_command(args: list[str]) -> tuple[float, float, float]:
    """Wall seconds, peak RSS and RSS after imports (MB) of `weightlab ARGS` in a fresh process."""
    # VmHWM (the peak resident set of this address space) starts afresh at exec, unlike
    # ru_maxrss, which a child inherits from the parent that forked it.
    code = ("import sys, time; from weightlab.cli import main; import weightlab.report.plots\n"
            "hwm = lambda: int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) / 1024\n"
            "rss0 = hwm(); t = time.perf_counter()\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print(time.perf_counter() - t, hwm(), rss0)")
    out = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True).stdout
    wall, rss, rss0 = out.strip().splitlines()[-1].split()
    return float(wall), float(rss), float(rss0)

