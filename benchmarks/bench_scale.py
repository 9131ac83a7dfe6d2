"""Scale-out: `compare` over a bank of 8 fine-tunes and `spectrum`, here and on a 2-worker local
Ray cluster (`ray start --head --num-cpus 2`), in one run.

    python benchmarks/bench_scale.py              # Llama shape with 4 layers (~80M parameters), 8 fine-tunes
    python benchmarks/bench_scale.py --layers 2 --hidden 256 --vocab 4096   # quick

Wall time and the driver's peak RSS of each, and whether the JSON bytes are the same. On a
2-core machine the cluster shares the local run's cores: the figures measure the overhead of
distributing, not a speed-up (that needs more nodes).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_args, run_command, save_result
from generate import ROOT, Shape, generate


def main() -> None:
    args = bench_args(__doc__, "scale")
    shape = Shape(4, args.hidden, args.vocab) if args.layers == Shape.layers else args.shape
    paths = generate(shape, finetunes=8)
    fts = [str(paths[f"ft{i}"]) for i in range(8)]
    out = ROOT / "scale-out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray") or "ray"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}  # a throwaway local cluster
    os.environ.update(env)  # the weightlab runs connect without a token too
    subprocess.run(
        [
            ray,
            "start",
            "--head",
            "--num-cpus",
            "2",
            "--port",
            str(port),
            "--include-dashboard",
            "false",
            "--disable-usage-stats",
        ],
        check=True,
        capture_output=True,
        env=env,
    )
    result: dict = {"parameters": shape.parameters, "finetunes": 8, "shape": vars(shape)}
    try:
        for name, command in (
            ("compare", ["compare", "--base", str(paths["base"]), *fts]),
            ("spectrum", ["spectrum", str(paths["base"]), fts[0], "--no-cache"]),
        ):
            entry = {}
            for where, extra in (("local", []), ("ray_2_workers", ["--ray", f"127.0.0.1:{port}"])):
                wall, rss, _ = run_command([*command, "--json", str(out / f"{name}-{where}.json"), "--force", *extra])
                entry[where] = {"wall_s": round(wall, 2), "driver_peak_rss_mb": round(rss)}
            entry["ratio_ray_to_local"] = round(entry["ray_2_workers"]["wall_s"] / entry["local"]["wall_s"], 3)
            entry["same_json_bytes"] = (out / f"{name}-local.json").read_bytes() == (
                out / f"{name}-ray_2_workers.json"
            ).read_bytes()
            result[name] = entry
    finally:
        subprocess.run([ray, "stop", "--force"], capture_output=True, env=env)
    shutil.rmtree(out, ignore_errors=True)
    save_result(result, args.out)


if __name__ == "__main__":
    main()
