"""What quantization did to a model: the tiny Llama quantized to GGUF Q8_0 and Q4_0 by llama.cpp's
`gguf` package, then `quant-error` against the original (per matrix: error, SNR, bits, whether the
error is noise or structure, the top singular directions, α), and the report."""

import json
import subprocess
import sys

from _models import to_gguf, workspace

m = workspace()
q8 = to_gguf(m["base"], "out/base.Q8_0.gguf", "Q8_0")
q4 = to_gguf(m["base"], "out/base.Q4_0.gguf", "Q4_0")
args = ["quant-error", m["base"], q8, q4, "--report", "out/quant.html", "--json", "out/quant.json", "--force"]
subprocess.run([sys.executable, "-m", "weightlab", *map(str, args)], check=True)
for model in json.loads(open("out/quant.json").read())["models"]:
    print(
        f"{model['quantized']}: {model['bits_per_weight']:.2f} bits/weight, error {model['relative_error']:.2%}, "
        f"{model['noise_like_share']:.0%} of matrices noise-like, worst layers {model['worst_layers']}"
    )
print("open out/quant.html")
