"""Benchmark `weightlab spectrum` against the bare SVD compute of the same matrices, in one run.

    python benchmarks/bench_spectrum.py            # BERT-large shape, ~334M parameters
    python benchmarks/bench_spectrum.py --layers 4 # quick

Reports: wall time of the whole command (reading, prefetch, maths, bookkeeping) vs the bare
decompositions it needs (thin SVD of W and W', singular values of ΔW) on matrices already in
memory; peak RSS of the command vs the largest tensor and the model size; weightwatcher's
`analyze()` on the same model when it is importable.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SCRATCH_JSON, bench_args, run_command, save_result  # noqa: E402
from generate import generate, parameters  # noqa: E402

from weightlab.compute.svd import full_svd, singular_values  # noqa: E402
from weightlab.io import open_checkpoint  # noqa: E402
from weightlab.compute.walk import TensorWalk  # noqa: E402


def bare_compute(base_path: Path, ft_path: Path) -> tuple[float, int]:
    """Seconds of the decompositions alone, each matrix loaded before its clock starts."""
    base, ft = open_checkpoint(base_path), open_checkpoint(ft_path)
    items = TensorWalk([base, ft]).items
    total = 0.0
    for item in items:
        w, w2 = base.get(item.names[0])[None], ft.get(item.names[1])[None]
        start = time.perf_counter()
        full_svd(w), full_svd(w2), singular_values(w2 - w)
        total += time.perf_counter() - start
    return total, len(items)


def weightwatcher_time(base_path: Path, layers: int, hidden: int) -> float | None:
    """Seconds of weightwatcher's `analyze()` on the base model (one checkpoint, same matrices)."""
    try:
        import weightwatcher
    except ImportError:
        return None
    from transformers import BertConfig, BertModel

    config = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=16,
                        intermediate_size=4 * hidden)
    model = BertModel(config)
    ckpt = open_checkpoint(base_path)
    model.load_state_dict({n: ckpt.get(n) for n in ckpt.names()}, strict=False)
    start = time.perf_counter()
    weightwatcher.WeightWatcher(model=model).analyze()
    return time.perf_counter() - start


def main() -> None:
    args = bench_args(__doc__, "spectrum")
    paths = generate(args.layers, args.hidden)
    n_params = parameters(args.layers, args.hidden)
    largest = max(open_checkpoint(paths["base"]).info(n).nbytes for n in open_checkpoint(paths["base"]).names())
    wall, rss, rss0 = run_command(["spectrum", str(paths["base"]), str(paths["ft0"]), "--json", SCRATCH_JSON, "--force",
                             "--device", "cpu"])
    bare, n_matrices = bare_compute(paths["base"], paths["ft0"])
    ww = weightwatcher_time(paths["base"], args.layers, args.hidden)
    result = {
        "parameters": n_params, "matrices": n_matrices, "torch_threads": torch.get_num_threads(),
        "weightlab_spectrum_s": round(wall, 2), "bare_decompositions_s": round(bare, 2),
        "ratio_total_to_bare": round(wall / bare, 3),
        "peak_rss_mb": round(rss), "largest_tensor_mb": round(largest / 2**20), "model_mb": round(4 * n_params / 2**20),
        "rss_after_imports_mb": round(rss0),
        "peak_rss_over_largest_tensor": round(rss * 2**20 / largest, 2),
        "work_rss_over_largest_tensor": round((rss - rss0) * 2**20 / largest, 2),
        "weightwatcher_analyze_one_model_s": None if ww is None else round(ww, 2),
        # ours decomposes two checkpoints (W, W', ΔW); weightwatcher analyses one
        "speedup_vs_weightwatcher_per_checkpoint": None if ww is None else round(ww / (wall / 2), 2),
    }
    save_result(result, args.out)


if __name__ == "__main__":
    main()
