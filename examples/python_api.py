"""The Python API, as in a notebook: typed results, JSON-ready dictionaries."""

from _models import workspace

from weightlab.analysis.spectrum import SpectrumOptions, spectrum
from weightlab.analysis.tsd import TSDOptions, tsd
from weightlab.io import open_finetuned, open_weights

m = workspace()
base = open_weights(m["base"])
adapter = open_finetuned(m["warmup"], base)  # a PEFT adapter is a fine-tune too: W' = W + s·B·A
result = spectrum(base, [open_weights(m["ft_a"]), adapter], SpectrumOptions(k=4))
for ft, label in enumerate(("full fine-tune", "LoRA warm-up")):
    ms = [x for x in result.matrices if x.finetuned == ft]
    top = max(ms, key=lambda x: x.relative_change)
    print(
        f"{label}: {len(ms)} matrices, most changed {top.name} ({top.relative_change:.4f}),"
        f" intruders {sum(len(x.intruders) for x in ms)}"
    )
directions, _ = tsd(base, adapter, TSDOptions(top=4))
print("TSD indices of the first matrix:", directions.matrices[0].indices)
