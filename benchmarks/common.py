"""Shared by the benchmarks: run a weightlab command in a fresh process and measure it."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from generate import Shape

# A throwaway result file: the output planner refuses /dev/null (not a regular file).
SCRATCH_JSON = str(Path(tempfile.gettempdir()) / "weightlab-bench-result.json")


# Peak resident set of this process (MB): VmHWM starts afresh at exec, unlike ru_maxrss, which
# a child inherits from the parent that forked it.
PEAK_RSS = "int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) / 1024"


def fresh_python(code: str, args: list[str] = ()) -> str:
    """Run `code` with `args` in a fresh interpreter; its last line of output, or RuntimeError."""
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return done.stdout.strip().splitlines()[-1]


def run_command(args: list[str]) -> tuple[float, float, float]:
    """Wall seconds, peak RSS and RSS after imports (MB) of `weightlab ARGS` in a fresh process."""
    code = (
        "import sys, time; from weightlab.cli import main; import weightlab.report.plots\n"
        f"hwm = lambda: {PEAK_RSS}\n"
        "rss0 = hwm(); t = time.perf_counter()\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "print(time.perf_counter() - t, hwm(), rss0)"
    )
    try:
        wall, rss, rss0 = fresh_python(code, args).split()
    except RuntimeError as e:
        raise SystemExit(f"weightlab {' '.join(args)} failed:\n{e}") from None
    return float(wall), float(rss), float(rss0)


def run_python(code: str, names: list[str] = ()) -> tuple[float, float, dict]:
    """Run `code` in a fresh interpreter; it sets SECONDS (what to time) and the variables in
    `names`. Returns SECONDS, the process's peak RSS (MB) and those variables. RuntimeError on failure."""
    wrapped = (
        code + f"\nimport json\nprint(json.dumps([SECONDS, {PEAK_RSS}, {{n: globals()[n] for n in {list(names)!r}}}]))"
    )
    seconds, rss, values = json.loads(fresh_python(wrapped))
    return seconds, rss, values


def run_external(command: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of another program (a peer tool), run as a child of a small
    wrapper so that its maximum resident set is its own (RUSAGE_CHILDREN)."""
    code = (
        "import resource, subprocess, sys, time\n"
        "t = time.perf_counter(); done = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "wall = time.perf_counter() - t\n"
        "if done.returncode: sys.exit(done.stderr[-2000:])\n"
        "print(wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)"
    )
    try:
        wall, rss = fresh_python(code, command).split()
    except RuntimeError as e:
        raise RuntimeError(f"{' '.join(command)} failed:\n{e}") from None
    return float(wall), float(rss)


def bench_args(doc: str, result_name: str, **extra: int) -> argparse.Namespace:
    """The options every benchmark takes: the model shape and where the result JSON goes."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=Shape.layers)
    parser.add_argument("--hidden", type=int, default=Shape.hidden)
    parser.add_argument("--vocab", type=int, default=Shape.vocab)
    for name, default in extra.items():
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / f"{result_name}.json")
    args = parser.parse_args()
    args.shape = Shape(args.layers, args.hidden, args.vocab)
    return args


def save_result(result: dict, path: Path) -> None:
    """Write the result JSON and print it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
