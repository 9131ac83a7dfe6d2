"""Every module imports on its own: no import cycle hides behind the order tests import in."""

import pkgutil
import subprocess
import sys

import weightlab

PROBE = r"""
import importlib, sys, traceback
import torch, numpy, scipy, matplotlib, typer, rich, yaml, safetensors  # third-party, loaded once
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "weightlab" or m.startswith("weightlab.")]:
        del sys.modules[loaded]  # each module starts from an empty weightlab namespace
    try:
        importlib.import_module(name)
    except Exception:
        failed.append(name + ": " + traceback.format_exc().strip().splitlines()[-1])
print("\n".join(failed))
sys.exit(1 if failed else 0)
"""


def all_modules() -> list[str]:
    """Every module but `__main__`, which runs the command line when imported (tested by running it)."""
    return sorted(
        m.name for m in pkgutil.walk_packages(weightlab.__path__, "weightlab.") if m.name != "weightlab.__main__"
    )


def test_every_module_imports_alone_in_a_fresh_interpreter():
    modules = all_modules()
    assert len(modules) > 40 and "weightlab.naming" in modules
    done = subprocess.run([sys.executable, "-c", PROBE, *modules], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr


def test_python_dash_m_weightlab_runs_the_command_line():
    done = subprocess.run([sys.executable, "-m", "weightlab", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "merge" in done.stdout, done.stderr


def test_the_naming_module_that_used_to_cycle_imports_first():
    done = subprocess.run([sys.executable, "-c", "import weightlab.naming"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


LIGHT = r"""
import sys
import weightlab.cli.commands, weightlab.options, weightlab.io.outputs  # what a refusal or --help needs
import weightlab.api.analyses, weightlab.api.operations  # what checks the inputs, before any model loads
heavy = sorted(m for m in ("torch", "numpy", "scipy", "matplotlib", "transformers", "safetensors", "huggingface_hub",
                           "ray", "peft") if m in sys.modules)
print(" ".join(heavy))
"""


def test_the_command_line_starts_without_the_numerical_libraries():
    """`--help`, `--version`, a refused option or a missing input answer before torch, scipy or
    matplotlib load (each costs seconds on a busy machine): every command module imports the
    library inside the command."""
    done = subprocess.run([sys.executable, "-c", LIGHT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "", done.stdout + done.stderr
