"""Ctrl-C and SIGTERM, at any moment: one line, exit 128 + signal, nothing left behind."""

from __future__ import annotations

import json
import os
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


SIGNAL_WHILE_IMPORTING = """
import os, signal, sys
from weightlab.cli import main

class SignalOnImport:  # deliver the signal exactly when the named module starts to load
    def find_spec(self, name, path=None, target=None):
        if name == sys.argv[2]:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), getattr(signal, sys.argv[1]))
        return None

sys.meta_path.insert(0, SignalOnImport())
main(sys.argv[3:])
"""


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize(
    "module", ["numpy._core._multiarray_umath", "torch._C", "safetensors", "scipy.linalg", "weightlab.merging.run"]
)
def test_a_signal_in_the_middle_of_an_import_waits_for_it_then_is_one_line(
    signame, module, slow_merge_inputs, tmp_path
):
    """Raised inside an import, an interrupt left numpy half loaded: a traceback, a RecursionError or
    an abort followed. It is delivered once the import is done: one line, 128 + signal."""
    root, out = slow_merge_inputs, tmp_path / "merged"
    args = ["merge", "--method", "tsv", "--base", str(root / "base"), str(root / "a"), str(root / "b"), "-o", str(out)]
    done = subprocess.run(
        [sys.executable, "-c", SIGNAL_WHILE_IMPORTING, signame, module, *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 128 + getattr(signal, signame), done.stderr
    assert done.stderr.strip().splitlines() == [f"interrupted ({signame}): nothing was written"], done.stderr
    assert list(tmp_path.iterdir()) == []


SIGNAL_AT_COMMIT = """
import os, signal, sys
from weightlab.cli import main
from weightlab.io import outputs

commit = outputs.OutputPlan._commit

def commit_then_signal(self):  # the signal arrives while the outputs move into place
    os.kill(os.getpid(), signal.SIGTERM)
    commit(self)

outputs.OutputPlan._commit = commit_then_signal
main(sys.argv[1:])
"""


def test_a_signal_while_outputs_move_into_place_lets_them_all_land_and_says_so(zoo, tmp_path):
    """All of a command's outputs appear together or not at all: a signal during the commit waits for
    it, and the line says the outputs were written."""
    json_out, report = tmp_path / "s.json", tmp_path / "s.html"
    args = ["spectrum", str(zoo["llama"]), str(zoo["llama_ft"]), "--json", str(json_out), "--report", str(report)]
    done = subprocess.run([sys.executable, "-c", SIGNAL_AT_COMMIT, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 143, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"interrupted (SIGTERM) after its outputs were written: {json_out}, {report}"
    ]
    assert json.loads(json_out.read_text())["schema"] and report.stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.html", "s.json"]


def test_a_killed_run_leaves_staging_that_the_next_run_removes(slow_merge_inputs, tmp_path):
    """SIGKILL (or an abort under a memory cap) runs no cleanup: the staging folder stays. The next
    run that stages beside it removes it, and never one whose process is alive."""
    root = slow_merge_inputs
    args = ["merge", "--method", "tsv", "--base", str(root / "base"), str(root / "a"), str(root / "b")]
    killed = subprocess.Popen(
        [sys.executable, "-c", "from weightlab.cli import main; main()", *args, "-o", str(tmp_path / "m1")]
    )
    deadline = time.monotonic() + 60
    while not any(p.name.endswith(".partial") for p in tmp_path.iterdir()):
        assert killed.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    killed.kill()
    killed.wait()
    left = [p.name for p in tmp_path.iterdir()]
    assert left and all(name.endswith(".partial") for name in left)  # what SIGKILL leaves
    alive = subprocess.Popen(
        [sys.executable, "-c", "from weightlab.cli import main; main()", *args, "-o", str(tmp_path / "m2")]
    )
    while not any(p.name.startswith(".m2.") for p in tmp_path.iterdir()):
        assert alive.poll() is None and time.monotonic() < deadline + 60
        time.sleep(0.01)
    from weightlab.cli import main

    with pytest.raises(SystemExit) as ended:  # a third run stages in the same folder meanwhile
        main(["inspect", str(root / "base"), "--json", str(tmp_path / "inv.json")])
    assert ended.value.code == 0
    assert alive.wait(timeout=300) == 0  # its staging was left alone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inv.json", "m2"]  # the dead run's is gone


def test_sweep_removes_only_folders_whose_process_ended(tmp_path):
    from weightlab.io.atomic import LOCK, private_folder, sweep

    live = private_folder(tmp_path, ".live.")
    dead = private_folder(tmp_path, ".dead.")
    assert dead.lock is not None
    os.close(dead.lock)  # as if its process had ended
    dead.lock = None
    (tmp_path / ".foreign.partial").mkdir()  # no lock file: not weightlab's
    (tmp_path / ".file.partial").write_text("x")
    (tmp_path / ".unlocked.partial").mkdir()
    (tmp_path / ".unlocked.partial" / LOCK).symlink_to(tmp_path / ".file.partial")  # a link is not our lock
    sweep(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [live.path.name, ".foreign.partial", ".file.partial", ".unlocked.partial"]
    )
    live.remove()
