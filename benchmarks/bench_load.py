"""weightlab on a busy machine, and how fast it starts.

1. `spectrum` of the real MiniLM against a seeded perturbation of it (--no-cache, so every run does
   the same work), alone and beside a CPU-bound neighbour (one spinning process per CPU), with
   weightlab's thread settings (idle threads sleep: OMP_WAIT_POLICY=PASSIVE, OpenBLAS's shortest
   spin) and with the libraries' own defaults (idle threads spin). CPU seconds come from the
   child's rusage; the goal is loaded CPU ≤ 1.3 × quiet CPU.
2. Start-up: `weightlab --help`, `--version`, and a refused option and a missing input, each the
   median of several fresh processes; the goal is ≤ 0.5 s on a quiet machine.

Usage: python benchmarks/bench_load.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import save_result

BENCH = Path(__file__).resolve().parent.parent / ".bench" / "load"
LIBRARY_DEFAULTS = {"OMP_WAIT_POLICY": "", "OPENBLAS_THREAD_TIMEOUT": ""}  # empty: each library's own default


def pair() -> tuple[Path, Path]:
    """The real MiniLM and a seeded perturbation of every floating tensor (1% of its std)."""
    import torch
    from safetensors.torch import load_file, save_file

    from weightlab.examples import minilm_path

    base = minilm_path()
    ft = BENCH / "ft"
    if not (ft / "model.safetensors").is_file():
        ft.mkdir(parents=True, exist_ok=True)
        gen = torch.Generator().manual_seed(0)
        tensors = {
            k: v + 0.01 * v.std() * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
            for k, v in load_file(base / "model.safetensors").items()
        }
        save_file(tensors, ft / "model.safetensors")
        shutil.copy(base / "config.json", ft / "config.json")
    return base, ft


def measured(args: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (user + system) and exit code of `weightlab ARGS` in a fresh process."""
    started = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-m", "weightlab", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
    )
    _, status, usage = os.wait4(child.pid, 0)
    return time.perf_counter() - started, usage.ru_utime + usage.ru_stime, os.waitstatus_to_exitcode(status)


def neighbour() -> list[subprocess.Popen]:
    """A CPU-bound neighbour: one spinning process per CPU."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]


def spectrum_runs(base: Path, ft: Path, repeat: int) -> dict:
    args = ["spectrum", str(base), str(ft), "--no-cache", "--json", str(BENCH / "spectrum.json"), "--force"]
    out = {}
    for setting, extra in (("weightlab", {}), ("library defaults", LIBRARY_DEFAULTS)):
        env = {**os.environ, **extra}
        quiet = [measured(args, env)[:2] for _ in range(repeat)]
        hogs = neighbour()
        try:
            loaded = [measured(args, env)[:2] for _ in range(repeat)]
        finally:
            for hog in hogs:
                hog.kill()
        q_cpu, l_cpu = statistics.median(c for _, c in quiet), statistics.median(c for _, c in loaded)
        out[setting] = {
            "quiet_wall_s": statistics.median(w for w, _ in quiet),
            "quiet_cpu_s": q_cpu,
            "loaded_wall_s": statistics.median(w for w, _ in loaded),
            "loaded_cpu_s": l_cpu,
            "loaded_over_quiet_cpu": l_cpu / q_cpu,
        }
    out["goal_loaded_over_quiet_cpu"] = 1.3
    out["goal_met"] = out["weightlab"]["loaded_over_quiet_cpu"] <= 1.3
    return out


def startup_runs(base: Path, repeat: int) -> dict:
    cases = {
        "--help": ["--help"],
        "--version": ["--version"],
        "spectrum --help": ["spectrum", "--help"],
        "refused option (-k 0)": ["spectrum", str(base), str(base), "-k", "0"],
        "missing input": ["spectrum", str(base), str(BENCH / "nowhere")],
    }
    out = {
        name: statistics.median(measured(args, dict(os.environ))[0] for _ in range(repeat))
        for name, args in cases.items()
    }
    return {"wall_s": out, "goal_s": 0.5, "goal_met": max(out.values()) <= 0.5}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "load.json")
    args, _ = parser.parse_known_args()  # run_all.sh passes the model-shape options to every benchmark
    base, ft = pair()
    save_result(
        {
            "cpus": os.cpu_count(),
            "spectrum_minilm": spectrum_runs(base, ft, args.repeat),
            "startup": startup_runs(base, 2 * args.repeat + 1),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
