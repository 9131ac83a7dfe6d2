"""The import graph is one-way, as docs/architecture.md draws it: the floors below never import
the floors above, the feature packages (analysis, merge, surgery) never import one another, and
no two modules import each other — counting imports inside functions, which can hide a cycle."""

from __future__ import annotations

import ast
import pkgutil
from pathlib import Path

import weightlab

PACKAGE = Path(weightlab.__file__).parent
FEATURES = {"analysis", "merging", "surgery"}
# the floors, bottom up, and what each may import besides itself and the bottom floor; the top
# (cli, demo, synthetic, inventory, examples) may import anything
BOTTOM = {"errors", "interrupts", "domains", "typecheck", "options", "display", "model_config", "naming", "results"}
ALLOWED = {
    "io": set(),
    "matching": {"io"},
    "compute": {"io", "matching"},
    "analysis": {"io", "matching", "compute"},
    "merging": {"io", "matching", "compute"},
    "surgery": {"io", "matching", "compute"},
    "report": {"io", "matching", "compute", "analysis", "merging", "surgery", "inventory", "demo"},
    "api": {"io", "matching", "compute", "analysis", "merging", "surgery", "report", "inventory"},
}


def module_imports() -> dict[str, set[str]]:
    """Every weightlab module and the weightlab modules it imports, anywhere in its body."""
    out = {}
    for info in pkgutil.walk_packages([str(PACKAGE)], "weightlab."):
        path = PACKAGE.joinpath(*info.name.split(".")[1:])
        path = path / "__init__.py" if info.ispkg else path.with_suffix(".py")
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("weightlab"):
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("weightlab"))
        out[info.name] = found
    return out


def floor(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_each_floor_imports_only_the_floors_below_it():
    wrong = []
    for module, imports in module_imports().items():
        home = floor(module)
        if home not in ALLOWED and home not in BOTTOM:
            continue  # cli, demo, synthetic, inventory: the top, they may use anything
        for target in imports:
            there = floor(target)
            if there in (home, "") or there in BOTTOM or there in ALLOWED.get(home, set()):
                continue
            wrong.append(f"{module} imports {target}")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_feature_package_imports_another_and_results_imports_none():
    imports = module_imports()
    crossing = [
        f"{m} imports {t}"
        for m, ts in imports.items()
        for t in ts
        if floor(m) in FEATURES and floor(t) in FEATURES and floor(t) != floor(m)
    ]
    assert not crossing, crossing
    assert not {floor(t) for t in imports["weightlab.results"]} & (FEATURES | {"report", "cli", "io", "compute"})


def test_no_two_modules_import_each_other():
    imports = module_imports()

    def reaches(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for target in imports.get(todo.pop(), set()):
                if target not in seen and target in imports:
                    seen.add(target)
                    todo.append(target)
        return seen

    cycles = [m for m in imports if m in reaches(m) and not m.endswith("__init__") and m != "weightlab"]
    assert not cycles, sorted(cycles)
