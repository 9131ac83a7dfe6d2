"""Ctrl-C and SIGTERM, at any moment: one line, exit 128 + signal, nothing left behind."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

pytestmark = pytest.mark.slow  # the fast lane, pytest -m "not slow", leaves these out

INTERRUPT_WHILE_IMPORTING = """
import os, signal, sys
from weightlab.cli import main

class InterruptOnTorch:  # deliver the signal exactly while the heavy imports run
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            os.kill(os.getpid(), getattr(signal, sys.argv[1]))
        return None

sys.meta_path.insert(0, InterruptOnTorch())
main(sys.argv[2:])
"""


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_an_interrupt_during_the_imports_is_one_line_and_exit_128_plus_signal(signame, zoo, tmp_path):
    out = tmp_path / "inv.json"
    done = subprocess.run(
        [sys.executable, "-c", INTERRUPT_WHILE_IMPORTING, signame, "inspect", str(zoo["llama"]), "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 128 + getattr(signal, signame), done.stderr
    assert done.stderr.strip().splitlines() == [f"interrupted ({signame}): nothing was written"]
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def slow_merge_inputs(tmp_path_factory) -> Path:
    """Three checkpoints whose TSV merge takes seconds: time to interrupt it."""
    root = tmp_path_factory.mktemp("slow")
    gen = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.proj.weight": torch.randn(384, 384, generator=gen) for i in range(48)}
    for name, shift in (("base", 0.0), ("a", 0.01), ("b", 0.02)):
        (root / name).mkdir()
        save_file(
            {k: v + shift * torch.randn(v.shape, generator=gen) for k, v in base.items()},
            root / name / "model.safetensors",
        )
    return root


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_an_interrupted_merge_leaves_no_partial_output(signame, slow_merge_inputs, tmp_path):
    root, out = slow_merge_inputs, tmp_path / "merged"
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from weightlab.cli import main; main()",
            "merge",
            "--method",
            "tsv",
            "--base",
            str(root / "base"),
            str(root / "a"),
            str(root / "b"),
            "-o",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not any(p.name.endswith(".partial") for p in tmp_path.iterdir()):  # the merge is writing
        assert process.poll() is None and time.monotonic() < deadline, "the merge ended before it could be interrupted"
        time.sleep(0.01)
    time.sleep(0.2)
    process.send_signal(getattr(signal, signame))
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + getattr(signal, signame), err
    assert err.strip().splitlines()[-1] == f"interrupted ({signame}): nothing was written"
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # neither the output nor its staging folder
