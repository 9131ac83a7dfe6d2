"""The Python API: one function per command, re-exported flat as `weightlab.spectrum`,
`weightlab.merging`, … (`import weightlab as wl`). Functions load on first use, so the command
line, which imports this package's frame, stays free of numerical libraries; a function added in
a new module of this package (an extension, docs/extending.md) is found by its name too."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

HOMES = {
    **{
        name: "analyses"
        for name in ("inspect", "spectrum", "esd", "quant_error", "experts", "compare", "angles", "gaussian", "tsd")
    },
    **{
        name: "operations"
        for name in ("merge", "init_lora", "extract_lora", "mitigate_intruders", "slim_experts", "build_moe")
    },
}
__all__ = list(HOMES)


def __getattr__(name: str) -> Any:
    if name in HOMES:
        return getattr(importlib.import_module(f"weightlab.api.{HOMES[name]}"), name)
    for module in pkgutil.iter_modules(__path__):
        if module.name not in {"frame", *HOMES.values()}:
            found = getattr(importlib.import_module(f"weightlab.api.{module.name}"), name, None)
            if callable(getattr(found, "core", None)):
                return found
    raise AttributeError(f"module 'weightlab' has no function {name!r}")
