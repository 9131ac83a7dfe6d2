"""The Python API, as in a notebook: one function per command, models from disk or memory, DataFrames."""

from _models import workspace
from transformers import AutoModel

import weightlab as wl

m = workspace()
spectrum = wl.spectrum(m["base"], [m["ft_a"], m["warmup"]], top_k=4)  # a full fine-tune and a LoRA warm-up
frame = spectrum.to_pandas()
for name, rows in frame.groupby("finetuned"):
    top = rows.loc[rows["relative_change"].idxmax()]
    print(f"{name}: {len(rows)} matrices, most changed {top['name']} ({top['relative_change']:.4f})")

base = AutoModel.from_pretrained(m["base"])  # the same base, in memory
directions = wl.tsd(base, m["warmup"], top=4)
print("TSD indices of the first matrix:", directions.matrices[0].indices)
merged = wl.merge(base, [m["ft_a"], m["ft_b"]], method="ties", density=0.3)  # in memory: a state dict
print(merged, "| first merged tensor:", next(iter(merged)))
