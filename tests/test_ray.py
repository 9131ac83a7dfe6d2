"""Every analysis on a real Ray cluster gives the bytes of a local run: in-process (`ray.init`)
and through the CLI against a cluster started with `ray start --head`. A path a worker cannot
read is one clear error; without Ray, --ray says how to install it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from weightlab.analysis.angles import AnglesOptions, angles
from weightlab.analysis.compare import compare
from weightlab.analysis.esd import ESDOptions, esd
from weightlab.analysis.gaussian import GaussianOptions, gaussian
from weightlab.analysis.spectrum import spectrum
from weightlab.analysis.tsd import tsd
from weightlab.compute.device import Compute
from weightlab.errors import CheckpointNotFound, InvalidArgument
from weightlab.io import open_checkpoint, open_finetuned

pytestmark = pytest.mark.slow  # the fast lane, pytest -m "not slow", leaves these out

# a throwaway cluster on this machine: no usage stats, no token (Ray ≥ 2.5x asks every client for one)
LOCAL_CLUSTER_ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
LOCAL = Compute.create("cpu")
CLUSTER = replace(LOCAL, cluster="auto")


@pytest.fixture(scope="module")
def in_process():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def same(run) -> None:
    here, there = run(LOCAL), run(CLUSTER)
    assert json.dumps(here.to_dict()) == json.dumps(there.to_dict())


def test_every_analysis_on_ray_equals_the_local_run(in_process, zoo, adapters):
    base = open_checkpoint(zoo["llama"])
    ft = open_checkpoint(zoo["llama_ft"])
    adapter = open_finetuned(adapters["llama"], base)
    same(lambda c: spectrum(base, [ft, adapter], compute=c))
    same(lambda c: compare(base, [ft, adapter, open_checkpoint(zoo["llama_sharded"])], compute=c))
    same(lambda c: angles(ft, adapter, base, AnglesOptions(k=4), compute=c))
    same(lambda c: gaussian(ft, base, GaussianOptions(min_elements=64), compute=c))
    same(lambda c: tsd(base, ft, compute=c)[0])
    same(lambda c: esd(ft, base, ESDOptions(seed=3), compute=c))


def test_a_path_a_worker_cannot_read_is_one_clear_error(in_process, zoo, tmp_path):
    shutil.copytree(zoo["llama_ft"], tmp_path / "ft")
    ft = open_checkpoint(tmp_path / "ft")  # the driver reads the header, then the file goes away
    (tmp_path / "ft" / "model.safetensors").unlink()
    with pytest.raises(CheckpointNotFound, match="cannot be read on Ray node"):
        spectrum(open_checkpoint(zoo["llama"]), [ft], compute=CLUSTER)


def test_without_ray_the_option_says_how_to_install_it(zoo, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    base = open_checkpoint(zoo["llama"])
    with pytest.raises(InvalidArgument, match=r'pip install "weightlab\[ray\]"'):
        spectrum(base, [open_checkpoint(zoo["llama_ft"])], compute=CLUSTER)


@pytest.fixture(scope="module")
def head_node(tmp_path_factory):
    """A real cluster on this machine, as users start one: `ray start --head`, stopped at the end."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = LOCAL_CLUSTER_ENV
    ray_bin = shutil.which("ray") or os.path.join(os.path.dirname(sys.executable), "ray")
    subprocess.run(
        [
            ray_bin,
            "start",
            "--head",
            "--num-cpus",
            "2",
            "--port",
            str(port),
            "--include-dashboard",
            "false",
            "--disable-usage-stats",
        ],
        check=True,
        capture_output=True,
        env=env,
        timeout=120,
    )
    yield f"127.0.0.1:{port}"
    ray.shutdown()  # `ray stop` ends every Ray process on this machine: leave none connected to it
    subprocess.run([ray_bin, "stop", "--force"], capture_output=True, env=env, timeout=120)


def test_cli_against_a_started_cluster_writes_the_local_bytes(head_node, zoo, tmp_path):
    def cli(*args: str) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "weightlab", *args],
            capture_output=True,
            text=True,
            timeout=300,
            env=LOCAL_CLUSTER_ENV,
        )
        assert done.returncode == 0, done.stderr[-2000:]

    common = [str(zoo["llama"]), str(zoo["llama_ft"]), "--force"]
    cli("spectrum", *common, "--json", str(tmp_path / "local.json"))
    cli("spectrum", *common, "--json", str(tmp_path / "ray.json"), "--ray", head_node)
    assert (tmp_path / "local.json").read_bytes() == (tmp_path / "ray.json").read_bytes()
    fts = [str(zoo["llama_ft"]), str(zoo["llama_sharded"])]
    cli("compare", "--base", str(zoo["llama"]), *fts, "--force", "--json", str(tmp_path / "c-local.json"))
    cli(
        "compare",
        "--base",
        str(zoo["llama"]),
        *fts,
        "--force",
        "--json",
        str(tmp_path / "c-ray.json"),
        "--ray",
        head_node,
    )
    assert (tmp_path / "c-local.json").read_bytes() == (tmp_path / "c-ray.json").read_bytes()


def test_merges_on_ray_write_the_local_bytes(in_process, zoo, tmp_path):
    """Workers write their tensors into the staged shards; the driver writes the rest and commits."""
    from weightlab.merging.config import MergeConfig
    from weightlab.merging.run import merge

    models = [str(zoo["llama_ft"]), str(zoo["llama_sharded"])]
    for label, extra in (
        ("ta", {"method": "task-arithmetic"}),
        ("ties-nan", {"method": "ties", "coeff": "nan", "params": {"density": 0.3}}),
        ("dare-svc", {"method": "dare-ties", "params": {"density": 0.5}, "modifiers": ["svc"]}),
    ):
        config = MergeConfig(base=str(zoo["llama"]), models=models, **extra)
        merge(config, tmp_path / f"{label}-local", compute=LOCAL)
        merge(config, tmp_path / f"{label}-ray", compute=CLUSTER)
        for file in sorted(p.name for p in (tmp_path / f"{label}-local").iterdir()):
            assert (tmp_path / f"{label}-local" / file).read_bytes() == (
                tmp_path / f"{label}-ray" / file
            ).read_bytes(), (label, file)
    lines = MergeConfig(base=str(zoo["llama"]), models=models, method="task-arithmetic", modifiers=["lines"])
    with pytest.raises(InvalidArgument, match="without --ray"):
        merge(lines, tmp_path / "lines", compute=CLUSTER)
    assert not (tmp_path / "lines").exists()


def test_lora_surgery_on_a_started_cluster_writes_the_local_bytes(head_node, zoo, tmp_path):
    """init-lora (its residual model written by the workers), extract-lora and mitigate-intruders
    (its checkpoint written by the workers): the same files."""

    def cli(*args: str) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "weightlab", *args],
            capture_output=True,
            text=True,
            timeout=300,
            env=LOCAL_CLUSTER_ENV,
        )
        assert done.returncode == 0, done.stderr[-2000:]

    for where, extra in (("local", []), ("ray", ["--ray", head_node])):  # same output paths: configs name them
        cli(
            "init-lora",
            str(zoo["llama"]),
            "--rank",
            "4",
            "--method",
            "pissa",
            "-o",
            str(tmp_path / "out" / "init"),
            "--residual-out",
            str(tmp_path / "out" / "residual"),
            *extra,
        )
        cli(
            "extract-lora",
            str(zoo["llama"]),
            str(zoo["llama_ft"]),
            "--rank",
            "4",
            "-o",
            str(tmp_path / "out" / "extract"),
            *extra,
        )
        cli(
            "mitigate-intruders",
            str(zoo["llama"]),
            str(zoo["llama_ft"]),
            "-o",
            str(tmp_path / "out" / "mitigated"),
            *extra,
        )
        (tmp_path / "out").rename(tmp_path / where)
    local = sorted(p.relative_to(tmp_path / "local") for p in (tmp_path / "local").rglob("*") if p.is_file())
    assert local and local == sorted(
        p.relative_to(tmp_path / "ray") for p in (tmp_path / "ray").rglob("*") if p.is_file()
    )
    for path in local:
        assert (tmp_path / "local" / path).read_bytes() == (tmp_path / "ray" / path).read_bytes(), path


def test_a_merge_that_fails_on_a_worker_leaves_nothing_under_its_name(in_process, zoo, tmp_path):
    """A NaN in a late tensor: a worker stops the merge mid-way, after others wrote theirs."""
    from safetensors.torch import load_file, save_file

    from weightlab.errors import CorruptCheckpoint
    from weightlab.merging.config import MergeConfig
    from weightlab.merging.run import merge

    shutil.copytree(zoo["llama_ft"], tmp_path / "ft")
    tensors = load_file(tmp_path / "ft" / "model.safetensors")
    last = sorted(n for n in tensors if n.startswith("layers.1.") and tensors[n].ndim == 2)[-1]
    tensors[last][0, 0] = float("nan")
    save_file(tensors, tmp_path / "ft" / "model.safetensors", metadata={"format": "pt"})
    config = MergeConfig(
        base=str(zoo["llama"]), models=[str(tmp_path / "ft"), str(zoo["llama_sharded"])], method="task-arithmetic"
    )
    out = tmp_path / "merged"
    with pytest.raises(CorruptCheckpoint, match=last):
        merge(config, out, compute=CLUSTER)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["ft"]


def _weightlab(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "weightlab", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=LOCAL_CLUSTER_ENV,
        **kwargs,
    )


@pytest.fixture()
def silent_port():
    """A port that accepts TCP connections and never says a word: Ray would wait on it for minutes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield s.getsockname()[1]


def test_a_dead_address_is_one_line_and_exit_2_at_once(zoo):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nobody listens there
    started = time.monotonic()
    done = _weightlab("spectrum", str(zoo["llama"]), str(zoo["llama_ft"]), "--ray", f"127.0.0.1:{port}")
    _out, err = done.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, err
    assert f"--ray 127.0.0.1:{port}: cannot reach a Ray cluster" in lines[0]
    assert time.monotonic() - started < 60  # the import of torch, not minutes of retries


def test_a_silent_address_gives_up_within_the_timeout(zoo, silent_port):
    started = time.monotonic()
    done = _weightlab(
        "spectrum", str(zoo["llama"]), str(zoo["llama_ft"]), "--ray", f"127.0.0.1:{silent_port}", "--ray-timeout", "3"
    )
    _out, err = done.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, err  # Ray's own warnings went to its log, not here
    assert "no Ray cluster connected within 3 s" in lines[0] and "Ray's log: " in lines[0]
    assert time.monotonic() - started < 45


def test_sigterm_while_connecting_exits_143_with_our_line(zoo, silent_port):
    done = _weightlab(
        "spectrum",
        str(zoo["llama"]),
        str(zoo["llama_ft"]),
        "--ray",
        f"127.0.0.1:{silent_port}",
        "--ray-timeout",
        "120",
        "--json",
        "never.json",
        cwd=str(zoo["llama"].parent.parent),
    )
    log = Path(tempfile.gettempdir()) / f"weightlab-ray-{done.pid}.log"
    deadline = time.monotonic() + 90
    while not log.exists() and time.monotonic() < deadline and done.poll() is None:
        time.sleep(0.1)
    assert log.exists(), "the connection never started"
    time.sleep(1)  # inside ray.init now
    sent = time.monotonic()
    done.send_signal(signal.SIGTERM)
    _out, err = done.communicate(timeout=30)
    assert done.returncode == 143, err
    assert time.monotonic() - sent < 10
    assert [line for line in err.splitlines() if line.strip()] == ["interrupted (SIGTERM): nothing was written"]


def test_ray_addresses_are_read_as_ray_writes_them():
    from weightlab.compute.ray_connect import host_and_port

    assert host_and_port("10.0.0.5:6380", "x") == ("10.0.0.5", 6380)
    assert host_and_port("ray://head:10001", "x") == ("head", 10001)
    assert host_and_port("[::1]:7000", "x") == ("::1", 7000)
    assert host_and_port("head", "x") == ("head", 6379)
    for bad in ("a:b:c", "host:99999", ":80", "host:port"):
        with pytest.raises(InvalidArgument, match="not a Ray address"):
            host_and_port(bad, "--ray " + bad)
