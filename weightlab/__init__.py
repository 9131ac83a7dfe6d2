"""weightlab: look inside model checkpoints and operate on them.

    import weightlab as wl
    wl.spectrum(base_model, [finetuned_model]).to_pandas()

One function per command (`wl.inspect`, `wl.spectrum`, `wl.esd`, `wl.quant_error`, `wl.experts`,
`wl.compare`, `wl.angles`, `wl.gaussian`, `wl.tsd`, `wl.merge`, `wl.init_lora`, `wl.extract_lora`,
`wl.mitigate_intruders`, `wl.slim_experts`, `wl.build_moe`),
with the command's options as keywords; models by path, Hub ID, or in memory (a torch module, a
PEFT model, a mapping of names to tensors or arrays). The command line (`weightlab --help`) is a
thin layer over these functions (`weightlab.api`), which use `weightlab.io` (checkpoints in and
out), `weightlab.analysis`, `weightlab.merging`, `weightlab.surgery` and `weightlab.report`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Idle math threads sleep instead of spinning: on a machine other work is using, spinning threads
# burnt 8x the CPU time of the same work (benchmarks/bench_load.py). Set before torch and scipy
# load their OpenMP and OpenBLAS runtimes; a value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")  # OpenBLAS's smallest spin (2^4 cycles) before sleeping

if TYPE_CHECKING:
    from weightlab.api.analyses import angles, compare, esd, experts, gaussian, inspect, quant_error, spectrum, tsd
    from weightlab.api.operations import build_moe, extract_lora, init_lora, merge, mitigate_intruders, slim_experts
    from weightlab.errors import WeightlabError

__all__ = [
    "WeightlabError",
    "angles",
    "build_moe",
    "compare",
    "esd",
    "experts",
    "extract_lora",
    "gaussian",
    "init_lora",
    "inspect",
    "merge",
    "mitigate_intruders",
    "quant_error",
    "slim_experts",
    "spectrum",
    "tsd",
]  # fmt: skip


def __getattr__(name: str) -> Any:
    """`wl.spectrum` and the other functions of `weightlab.api`, loaded on first use (the command
    line imports this package without them)."""
    if name == "WeightlabError":
        from weightlab.errors import WeightlabError

        return WeightlabError
    if name.startswith("_"):
        raise AttributeError(name)
    import weightlab.api

    return getattr(weightlab.api, name)
