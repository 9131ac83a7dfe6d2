"""Merge three fine-tunes: TIES with NAN coefficients, against plain task arithmetic."""

from _models import workspace

from weightlab.merging import merge
from weightlab.merging.config import build_config

m = workspace()
models = [str(m[k]) for k in ("ft_a", "ft_b", "ft_c")]
for name, options in {
    "task-arithmetic": {"method": "task-arithmetic", "param_values": {"lambda": 0.4}},
    "ties-nan": {"method": "ties", "coeff": "nan", "param_values": {"density": 0.3}},
}.items():
    report = merge(
        build_config({**options, "base": str(m["base"]), "models": models}), f"out/merged-{name}", force=True
    )
    print(name, "coefficients", [round(c, 4) for c in report.coefficients], "->", report.out)
