"""A damaged decomposition cache never changes a number: for every kind of damage, a warm run's
JSON equals a run without the cache, the entry is replaced, and a note says so."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from weightlab.compute.cache import DecompositionCache
from weightlab.compute.gram import GramSpectrum


def _bit_flip(entries: list[Path], rng: random.Random) -> None:
    path = rng.choice(entries)
    data = bytearray(path.read_bytes())
    data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))


def _swap_same_shape(entries: list[Path], rng: random.Random) -> None:
    """Another entry of the same size (same shapes) copied over this one: right shape, wrong values."""
    by_size: dict[int, list[Path]] = {}
    for path in entries:
        by_size.setdefault(path.stat().st_size, []).append(path)
    pairs = [group for group in by_size.values() if len(group) > 1]
    a, b = rng.sample(rng.choice(pairs), 2)
    shutil.copy(a, b)


def _truncate(entries: list[Path], rng: random.Random) -> None:
    path = rng.choice(entries)
    path.write_bytes(path.read_bytes()[: rng.randrange(path.stat().st_size)])


def _rewritten(change):
    """Damage with a valid checksum: the cache's own writer stores tampered values, so only the
    shape, dtype and finiteness checks stand between them and the numbers."""

    def damage(entries: list[Path], rng: random.Random) -> None:
        path = rng.choice(entries)
        cache, key = DecompositionCache(path.parent.parent), path.name.split(".")[0]
        from safetensors.torch import load_file

        tensors = load_file(path)
        cache.put(key, change(GramSpectrum(tensors["S"], tensors.get("E"), bool(tensors["tall"]))))

    return damage


def _nan(spec: GramSpectrum) -> GramSpectrum:
    s = spec.S.clone()
    s[0] = float("nan")
    return GramSpectrum(s, spec.E, spec.tall)


def _wrong_dtype(spec: GramSpectrum) -> GramSpectrum:
    if spec.E is None:  # an entry of values alone
        return GramSpectrum(spec.S.float(), None, spec.tall)
    return GramSpectrum(spec.S, spec.E.double(), spec.tall)


def _wrong_shape(spec: GramSpectrum) -> GramSpectrum:
    return GramSpectrum(spec.S[:-1].contiguous(), None if spec.E is None else spec.E[:-1].contiguous(), spec.tall)


def _empty(entries: list[Path], rng: random.Random) -> None:
    rng.choice(entries).write_bytes(b"")


def _folder(entries: list[Path], rng: random.Random) -> None:
    path = rng.choice(entries)
    path.unlink()
    path.mkdir()


def _link_to_another(entries: list[Path], rng: random.Random) -> None:
    a, b = rng.sample(entries, 2)
    b.unlink()
    b.symlink_to(a)


DAMAGE = {
    "bit-flip": _bit_flip,
    "same-shape-swap": _swap_same_shape,
    "truncation": _truncate,
    "empty": _empty,
    "nan": _rewritten(_nan),
    "wrong-dtype": _rewritten(_wrong_dtype),
    "wrong-shape": _rewritten(_wrong_shape),
    "folder": _folder,
    "link": _link_to_another,
}


@pytest.fixture(scope="module")
def reference(zoo, tmp_path_factory):
    root = tmp_path_factory.mktemp("cache-damage")
    from weightlab.cli import main

    try:
        main(["spectrum", str(zoo["llama"]), str(zoo["llama_ft"]), "--no-cache", "--json", str(root / "ref.json")])
    except SystemExit as e:
        assert not e.code
    return (root / "ref.json").read_bytes()


@pytest.mark.parametrize("kind", list(DAMAGE))
@pytest.mark.parametrize("seed", [0, 1])
def test_a_warm_run_on_a_damaged_cache_gives_the_numbers_of_no_cache(zoo, reference, run_cli, tmp_path, kind, seed):
    cache = tmp_path / "cache"
    args = ["spectrum", zoo["llama"], zoo["llama_ft"], "--cache-dir", cache]
    code, _, err = run_cli(*args, "--json", tmp_path / "cold.json")
    assert code == 0, err
    assert (tmp_path / "cold.json").read_bytes() == reference
    entries = sorted(p for p in cache.rglob("*.gram.safetensors"))
    DAMAGE[kind](entries, random.Random(f"{kind}-{seed}"))
    code, _, err = run_cli(*args, "--json", tmp_path / "warm.json")
    assert code == 0, err
    assert (tmp_path / "warm.json").read_bytes() == reference
    notes = [line for line in err.splitlines() if "damaged decomposition cache entry" in line]
    assert len(notes) >= 1 and all(line.startswith("note:") for line in notes), err
    code, _, err = run_cli(*args, "--json", tmp_path / "again.json")  # the bad entry was replaced: quiet now
    assert (tmp_path / "again.json").read_bytes() == reference
    assert "damaged" not in err or kind == "folder", err  # a folder in the way cannot be replaced; it stays a miss


@pytest.mark.slow
def test_a_named_pipe_in_the_cache_cannot_hang_a_run(zoo, reference, tmp_path):
    """A reader that opened the pipe would block forever: the entry is never opened that way."""
    cache = tmp_path / "cache"
    run = [
        sys.executable,
        "-m",
        "weightlab",
        "spectrum",
        str(zoo["llama"]),
        str(zoo["llama_ft"]),
        "--cache-dir",
        str(cache),
    ]
    assert (
        subprocess.run([*run, "--json", str(tmp_path / "cold.json")], capture_output=True, timeout=300).returncode == 0
    )
    for path in sorted(cache.rglob("*.gram.safetensors")):
        path.unlink()
        os.mkfifo(path)
    done = subprocess.run([*run, "--json", str(tmp_path / "warm.json")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "warm.json").read_bytes() == reference
    assert "not a regular file" in done.stderr
    assert all(p.is_file() for p in cache.rglob("*.gram.safetensors"))


def test_entries_prove_their_key_not_only_their_bytes(tmp_path):
    """An entry is bound to its key: a valid entry of another key is a miss."""
    from weightlab.compute.cache import content_key
    from weightlab.compute.gram import decompose

    cache = DecompositionCache(tmp_path)
    a, b = torch.randn(12, 8), torch.randn(12, 8)
    ka, kb = content_key(a), content_key(b)
    cache.put(ka, decompose(a))
    cache.put(kb, decompose(b))
    assert cache.get(ka, (12, 8), None) is not None
    shutil.copy(cache.path(kb), cache.path(ka))
    assert cache.get(ka, (12, 8), None) is None and not cache.path(ka).exists()


def test_entries_half_written_by_an_ended_process_are_swept(tmp_path):
    """A run killed between writing an entry and renaming it leaves `.KEY.PID.RANDOM.partial`: the
    next run removes those whose process has ended, never a live one's nor a file not of ours."""
    import os
    import subprocess
    import sys

    from weightlab.compute.cache import DecompositionCache
    from weightlab.options import CacheOptions

    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(ended.stdout)
    (tmp_path / "ab").mkdir()
    dead = tmp_path / "ab" / f".abcdef0123456789.{dead_pid}.0a1b2c3d4e5f.partial"
    live = tmp_path / "ab" / f".abcdef0123456789.{os.getpid()}.0a1b2c3d4e5f.partial"
    foreign = tmp_path / "ab" / ".notes.partial"
    for path in (dead, live, foreign):
        path.write_bytes(b"x")
    DecompositionCache.of(CacheOptions(cache_dir=tmp_path))
    assert not dead.exists() and live.exists() and foreign.exists()
