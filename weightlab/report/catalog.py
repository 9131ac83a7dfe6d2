"""Every kind of result, by schema: the modules that define results are imported here, when a
report is built from JSON files (a result registers itself when its module is imported). The
bottom floor, `results.py`, imports none of them; the features never import the report."""

from __future__ import annotations

import importlib
import pkgutil

import weightlab.analysis
import weightlab.surgery
from weightlab.results import Result, registered, registered_schemas

OTHER_RESULTS = ("weightlab.inventory", "weightlab.merging.run", "weightlab.merging.plan", "weightlab.demo")


def import_result_modules() -> None:
    """Import every module that may define a result: all of analysis/ and surgery/, and the rest by name."""
    for package in (weightlab.analysis, weightlab.surgery):
        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{package.__name__}.{module.name}")
    for name in OTHER_RESULTS:
        importlib.import_module(name)


def result_type(schema: object) -> type[Result] | None:
    """The result class of a schema string, whichever module defines it."""
    import_result_modules()
    return registered(schema)


def known_schemas() -> list[str]:
    import_result_modules()
    return registered_schemas()
