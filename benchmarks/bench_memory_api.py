"""What analysing a model held in memory costs in memory: the Python API on a ≥ 250M-parameter model.

    python benchmarks/bench_memory_api.py                 # Llama-shaped, 16 layers, hidden 1024: 334M parameters
    python benchmarks/bench_memory_api.py --layers 2      # quick

Each run is a fresh process that builds the model in memory (seeded, float32), then resets the
kernel's peak-RSS mark (/proc/self/clear_refs) and runs one analysis on the module itself. The
figure is the analysis's own peak: peak RSS during the call minus RSS before it, against the
model's size and its largest tensor (docs/python-api.md promises about one tensor's copies at a
time). Beside ours: the same measure for WeightWatcher's `analyze()` on the same module (when
installed), and for copying the state dict once, the least a copy-the-model approach pays.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fresh_python, save_result

BUILD = """
import json, time, torch, warnings
warnings.filterwarnings("ignore")
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
config = LlamaConfig(hidden_size={hidden}, intermediate_size=4 * {hidden}, num_hidden_layers={layers},
                     num_attention_heads=16, num_key_value_heads=16, vocab_size=32000, tie_word_embeddings=False)
with torch.no_grad():
    model = LlamaForCausalLM(config).eval()
    other = None
    if {pair}:
        torch.manual_seed(1)
        other = LlamaForCausalLM(config).eval()
tensors = list(model.state_dict().values())
PARAMS = sum(t.numel() for t in tensors)
MODEL_BYTES = sum(t.numel() * t.element_size() for t in tensors)
LARGEST = max(t.numel() * t.element_size() for t in tensors)
{prepare}
def rss(kind):
    return int(next(l for l in open("/proc/self/status") if l.startswith(kind)).split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # the peak mark starts again here
before = rss("VmRSS")
start = time.perf_counter()
{analysis}
SECONDS = time.perf_counter() - start
EXTRA = rss("VmHWM") - before
print(json.dumps(dict(params=PARAMS, model_bytes=MODEL_BYTES, largest=LARGEST, seconds=SECONDS, extra=EXTRA)))
"""

# each tool runs once on a tiny model first, so that what is measured is the analysis, not the
# libraries it loads on first use
WARM = "tiny = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))\n"
RUNS = {
    "wl.gaussian(model)": (WARM + "import weightlab as wl; wl.gaussian(tiny)", "wl.gaussian(model)", False),
    "wl.esd(model, traps off)": (WARM + "import weightlab as wl; wl.esd(tiny)", "wl.esd(model, traps=False)", False),
    "wl.spectrum(base, [ft], values_only)": (
        WARM + "import weightlab as wl; wl.spectrum(tiny, [tiny], values_only=True, no_cache=True)",
        "wl.spectrum(model, [other], values_only=True, no_cache=True)",
        True,
    ),
    "state dict copied once (reference)": ("", "copy = {k: v.clone() for k, v in model.state_dict().items()}", False),
    "WeightWatcher analyze() (peer)": (
        WARM + "import logging, weightwatcher; logging.disable(logging.WARNING)\n"
        "weightwatcher.WeightWatcher(model=tiny).analyze()",
        "weightwatcher.WeightWatcher(model=model).analyze()",
        False,
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "memory_api.json"))
    args = parser.parse_args()
    rows = {}
    for label, (prepare, analysis, pair) in RUNS.items():
        code = BUILD.format(hidden=args.hidden, layers=args.layers, pair=pair, prepare=prepare, analysis=analysis)
        try:
            measured = json.loads(fresh_python(code))
        except RuntimeError as e:
            if "weightwatcher" in label.lower() and "No module named" in str(e):
                print(f"{label}: not installed (benchmarks/setup.sh installs it)")
                continue
            raise
        mib = 2**20
        rows[label] = {
            "seconds": round(measured["seconds"], 2),
            "extra_peak_mib": round(measured["extra"] / mib, 1),
            "extra_over_largest_tensor": round(measured["extra"] / measured["largest"], 2),
            "extra_over_model": round(measured["extra"] / measured["model_bytes"], 3),
        }
        shape = measured
        print(
            f"{label:42s} +{measured['extra'] / mib:8.1f} MiB = {rows[label]['extra_over_largest_tensor']:5.2f}× "
            f"the largest tensor, {rows[label]['extra_over_model']:.3f}× the model ({measured['seconds']:.1f} s)"
        )
    result = {
        "model": f"Llama-shaped, {args.layers} layers, hidden {args.hidden}, vocab 32000, float32, in memory",
        "parameters": shape["params"],
        "model_mib": round(shape["model_bytes"] / 2**20, 1),
        "largest_tensor_mib": round(shape["largest"] / 2**20, 1),
        "runs": rows,
    }
    print(
        f"{shape['params'] / 1e6:.0f}M parameters, {result['model_mib']} MiB; "
        f"largest tensor {result['largest_tensor_mib']} MiB"
    )
    save_result(result, Path(args.out))


if __name__ == "__main__":
    main()
