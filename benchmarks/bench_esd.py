"""`weightlab esd` against WeightWatcher's `analyze()` on the same models: its numbers, side by side.

    python benchmarks/bench_esd.py              # the real pretrained MiniLM, then the generated Llama
    python benchmarks/bench_esd.py --layers 2   # quick

A parity check, not a test: per matrix, our α, stable rank, log spectral norm, spikes and traps
against WeightWatcher's α, stable_rank, log_spectral_norm, num_spikes (its `mp_fit=True`) and
rand_num_spikes (`randomize=True`), matched by module name. The α fit is WeightWatcher's own
formula (see docs/esd.md), so α and the norms should agree to rounding: WeightWatcher takes
float32 SVDs where we take float64 Gram eigenvalues, and drops eigenvalues below an absolute
1e-5 where we drop those below 1e-10·λ_max. Spikes are expected to differ: WeightWatcher fits
the bulk's σ to a kernel density estimate, we take it from the median eigenvalue (docs/esd.md).
Wall time of each, in a fresh process (WeightWatcher timed around `analyze()` only).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SCRATCH_JSON, bench_args, run_command, run_python, save_result
from generate import generate

WEIGHTWATCHER = """
import logging, time, warnings
warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)
import weightwatcher
from transformers import AutoModel
model = AutoModel.from_pretrained({model!r})
start = time.perf_counter()
frame = weightwatcher.WeightWatcher(model=model).analyze(mp_fit=True, randomize=True)
SECONDS = time.perf_counter() - start
COLUMNS = ["longname", "alpha", "stable_rank", "log_spectral_norm", "num_spikes", "rand_num_spikes"]
ROWS = frame[COLUMNS].to_dict("records")
"""


def _module(name: str) -> str:
    return name.removesuffix(".weight")


def compare(model: str) -> dict:
    import json

    wall, rss, _ = run_command(["esd", model, "--json", SCRATCH_JSON, "--force", "--device", "cpu"])
    ours = {_module(m["name"]): m for m in json.loads(Path(SCRATCH_JSON).read_text())["matrices"]}
    out: dict = {"model": model, "weightlab": {"wall_s": round(wall, 2), "peak_rss_mb": round(rss)}}
    try:
        seconds, ww_rss, extra = run_python(WEIGHTWATCHER.format(model=model), ["ROWS"])
    except RuntimeError as e:  # not installed: benchmarks/setup.sh installs it
        out["weightwatcher"] = f"not run: {str(e)[-300:]}"
        return out
    out["weightwatcher"] = {"analyze_s": round(seconds, 2), "peak_rss_mb": round(ww_rss)}
    out["time_ratio"] = round(wall / seconds, 3)
    pairs = []
    for row in extra["ROWS"]:
        match = [m for key, m in ours.items() if key.endswith(row["longname"]) or row["longname"].endswith(key)]
        if match:
            pairs.append((row, match[0]["weights"]))
    out["matched"] = f"{len(pairs)} of WeightWatcher's {len(extra['ROWS'])} layers; we analysed {len(ours)}"
    only_ours = sorted(
        set(ours) - {k for k in ours for row, _ in pairs if k.endswith(row["longname"]) or row["longname"].endswith(k)}
    )
    out["analysed_only_by_weightlab"] = only_ours

    def diffs(ww_key: str, our: callable, count: bool = False) -> dict:
        a = np.array([row[ww_key] for row, _ in pairs], dtype=float)
        b = np.array([np.nan if our(d) is None else our(d) for _, d in pairs], dtype=float)
        ok = np.isfinite(a) & np.isfinite(b) & (a != -1)
        d = np.abs(a[ok] - b[ok])
        out = {
            "compared": int(ok.sum()),
            "median_abs_diff": float(np.median(d)) if d.size else None,
            "max_abs_diff": float(d.max()) if d.size else None,
        }
        if count:
            out["equal"] = int((d == 0).sum())
        elif d.size:
            out["max_rel_diff"] = float((d / np.abs(a[ok])).max())
        return out

    out["alpha"] = diffs("alpha", lambda d: d["power_law"] and d["power_law"]["alpha"])
    out["stable_rank"] = diffs("stable_rank", lambda d: d["stable_rank"])
    out["log_spectral_norm"] = diffs("log_spectral_norm", lambda d: d["log_spectral_norm"])
    out["spikes"] = diffs("num_spikes", lambda d: d["mp"]["spikes"], count=True)
    out["traps"] = diffs("rand_num_spikes", lambda d: d["traps"], count=True)
    out["spikes_ours_total"] = int(sum(d["mp"]["spikes"] for _, d in pairs))
    out["spikes_weightwatcher_total"] = int(sum(row["num_spikes"] for row, _ in pairs))
    return out


def main() -> None:
    args = bench_args(__doc__, "esd")
    from weightlab.demo import minilm_path

    result = {
        "minilm (pretrained, real)": compare(str(minilm_path())),
        f"llama generated ({args.shape.parameters / 1e6:.0f}M)": compare(str(generate(args.shape)["base"])),
    }
    save_result(result, args.out)


if __name__ == "__main__":
    main()
