"""Quantized checkpoints (issue 37): what reading a GGUF file costs against the same model in
bfloat16 safetensors, and what `quant-error` costs, on a generated Llama, in one run.

    benchmarks/setup_llama_cpp.sh      # once: llama.cpp's converter and llama-quantize
    python benchmarks/bench_quant.py   # 7B shapes, two layers (hidden 4096, 11008, vocab 32000)
    python benchmarks/bench_quant.py --layers 2 --hidden 512 --intermediate 1376 --vocab 4096   # quick

The base (bfloat16, as bench_7b.py generates it) is converted by llama.cpp's own
`convert_hf_to_gguf.py` (bf16 out) and quantized by its `llama-quantize` (Q4_K_M by default: Q4_K
and Q6_K tensors). Each row is a fresh process with its wall time and peak RSS:
- read: every tensor once, as float32 (what the analyses take), from the safetensors folder,
  the bf16 GGUF and the Q4_K_M GGUF: wall and peak against the largest tensor's float32 size;
- quant-error of the Q4_K_M file against the safetensors original.
Two layers keep every matrix shape of Llama-2-7B (the embedding and lm_head are the largest), so
peak memory is the 7B model's; wall time scales with the layers.
"""

from __future__ import annotations

import argparse
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_command, run_python, save_result
from generate import ROOT, Shape, generate

TOKENIZER = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "gguf" / "llama" / "tokenizer.model"
READ = """
import torch
from weightlab.io import open_checkpoint
ckpt = open_checkpoint({path!r})
SECONDS = 0
import time
t = time.perf_counter()
for name in ckpt.names():
    ckpt.get(name, dtype=torch.float32)
SECONDS = time.perf_counter() - t
"""


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--type", default="Q4_K_M", help="llama-quantize's type (Q4_K_M, Q8_0, IQ4_XS, …).")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "quant.json")
    return parser.parse_args()


def tools() -> tuple[Path, Path, Path]:
    converter = ROOT / "llama.cpp" / "convert_hf_to_gguf.py"
    python = ROOT / "convert-env" / "bin" / "python"
    quantize = ROOT / "llama.cpp-build" / "bin" / "llama-quantize"
    if not (converter.is_file() and python.is_file() and quantize.is_file()):
        sys.exit("error: llama.cpp's tools are missing: run benchmarks/setup_llama_cpp.sh first")
    return python, converter, quantize


def gguf_files(base: Path, kind: str) -> tuple[Path, Path]:
    """The bf16 GGUF of `base` (llama.cpp's converter) and its `kind` quantization (llama-quantize),
    made once beside it."""
    python, converter, quantize = tools()
    bf16, quantized = base.parent / "base.bf16.gguf", base.parent / f"base.{kind}.gguf"
    if not bf16.exists():
        shutil.copy(TOKENIZER, base / "tokenizer.model")  # the converter needs a vocabulary; it pads to vocab_size
        convert = [str(python), str(converter), str(base), "--outtype", "bf16", "--outfile", str(bf16)]
        subprocess.run(convert, check=True)
    if not quantized.exists():
        subprocess.run([str(quantize), str(bf16), str(quantized), kind], check=True, capture_output=True)
    return bf16, quantized


def main() -> None:
    args = arguments()
    shape = Shape(args.layers, args.hidden, args.vocab, args.intermediate, "bfloat16")
    started = time.perf_counter()
    base = generate(shape, finetunes=0)["base"]
    bf16, quantized = gguf_files(base, args.type)
    largest = max(math.prod(s) for s in shape.tensors().values()) * 4 / 2**20
    result: dict = {
        "parameters": shape.parameters,
        "shape": {"layers": shape.layers, "hidden": shape.hidden, "intermediate": shape.intermediate},
        "vocab": shape.vocab,
        "quantization": args.type,
        "bytes": {"safetensors": shape.bytes, "gguf_bf16": bf16.stat().st_size, "gguf": quantized.stat().st_size},
        "largest_tensor_float32_mb": round(largest),
        "preparation_s": round(time.perf_counter() - started, 1),
        "rows": {},
    }
    rows = result["rows"]
    for row, path in (("read safetensors bf16", base), ("read GGUF bf16", bf16), (f"read GGUF {args.type}", quantized)):
        _, rss, values = run_python(READ.format(path=str(path)), ["SECONDS"])
        rows[row] = {"wall_s": round(values["SECONDS"], 2), "peak_rss_mb": round(rss)}
        print(row, rows[row], flush=True)
    reference = rows["read safetensors bf16"]["wall_s"]
    for entry in rows.values():
        entry["ratio_to_safetensors"] = round(entry["wall_s"] / reference, 2)
    out = ROOT / "quant-error.json"
    wall, rss, _ = run_command(["quant-error", str(base), str(quantized), "--no-cache", "--json", str(out), "--force"])
    rows["quant-error"] = {"wall_s": round(wall, 1), "peak_rss_mb": round(rss)}
    print("quant-error", rows["quant-error"], flush=True)
    save_result(result, args.out)


if __name__ == "__main__":
    main()
