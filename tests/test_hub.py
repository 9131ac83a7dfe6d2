"""Hub model IDs resolve through a Hugging Face cache laid out offline; nothing touches the network."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from conftest import hub_repo

from weightlab.errors import CorruptCheckpoint
from weightlab.io import open_checkpoint
from weightlab.io.hub import parse_hub_id

MAIN, V1 = "a" * 40, "b" * 40


def _publish(cache: Path, repo: str, commit: str, source: Path, refs: tuple[str, ...] = ("main",)) -> Path:
    """Lay `source` (a model folder) out as the Hub cache keeps a snapshot of `repo` at `commit`."""
    storage = cache / ("models--" + repo.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    shutil.copytree(source, snapshot)
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (storage / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture()
def hub(tmp_path, monkeypatch, zoo, adapters):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    _publish(cache, "org/tiny-llama", MAIN, zoo["llama"])
    _publish(cache, "org/tiny-llama", V1, zoo["llama_ft"], refs=("v1",))
    _publish(cache, "org/sharded", MAIN, zoo["llama_sharded"])
    _publish(cache, "org/adapter", MAIN, adapters["llama"])
    return cache


def test_parse_hub_id_reads_org_name_and_revision():
    assert parse_hub_id("Qwen/Qwen2.5-0.5B") == ("Qwen/Qwen2.5-0.5B", None)
    assert parse_hub_id("org/name@v1.0") == ("org/name", "v1.0")
    assert parse_hub_id("org/name@refs/pr/1") == ("org/name", "refs/pr/1")
    for not_an_id in (
        "model.safetensors",
        "./org/name",
        "/abs/path",
        "a/b/c",
        "org/",
        "org/name@",
        "org/..",
        "org/name@../../etc",
        "org/name@refs//x",
        "org/name@/abs",
    ):
        assert parse_hub_id(not_an_id) is None, not_an_id


def test_ids_resolve_to_the_cached_snapshot_of_the_revision(hub, zoo):
    main = open_checkpoint("org/tiny-llama")
    assert main.path.name == MAIN
    tagged = open_checkpoint("org/tiny-llama@v1")
    by_commit = open_checkpoint(f"org/tiny-llama@{V1}")
    assert tagged.path.name == by_commit.path.name == V1
    name = main.names()[0]
    assert not (main.get(name) == tagged.get(name)).all()  # v1 is the fine-tune


def test_sharded_and_adapter_repositories_open(hub, zoo):
    sharded = open_checkpoint("org/sharded")
    assert set(sharded.names()) == set(open_checkpoint(zoo["llama_sharded"]).names())
    assert type(open_checkpoint("org/adapter")).__name__ == "LoraAdapter"


def test_an_existing_local_path_wins_over_the_id(hub, zoo, tmp_path):
    shutil.copytree(zoo["llama_ft"], tmp_path / "org" / "tiny-llama")
    assert open_checkpoint("org/tiny-llama").path == Path("org/tiny-llama")


def test_spectrum_of_hub_ids_equals_the_local_run(hub, zoo, run_cli, tmp_path):
    code, _, err = run_cli("spectrum", "org/tiny-llama", "org/tiny-llama@v1", "--json", tmp_path / "hub.json")
    assert code == 0, err
    code, _, err = run_cli("spectrum", zoo["llama"], zoo["llama_ft"], "--json", tmp_path / "local.json")
    assert code == 0, err
    assert (
        json.loads((tmp_path / "hub.json").read_text())["matrices"]
        == json.loads((tmp_path / "local.json").read_text())["matrices"]
    )


def test_an_id_missing_from_the_offline_cache_is_one_line_exit_2(hub, run_cli):
    code, _out, err = run_cli("inspect", "org/absent")
    assert code == 2
    assert "org/absent" in err and "not in the cache" in err and "Traceback" not in err
    code, _, err = run_cli("inspect", "org/tiny-llama@no-such-tag")
    assert code == 2 and "not in the cache" in err


def test_a_revision_missing_its_weights_is_refused(hub, run_cli):
    snapshot = hub / "models--org--tiny-llama" / "snapshots" / MAIN
    (snapshot / "model.safetensors").unlink()
    code, _, err = run_cli("inspect", "org/tiny-llama")
    assert code == 2 and "model.safetensors" in err


def test_an_output_inside_the_hub_cache_of_an_input_is_refused(hub, run_cli, tmp_path):
    target = hub / "models--org--tiny-llama" / "out.json"
    code, _, err = run_cli("spectrum", "org/tiny-llama", "org/tiny-llama@v1", "--json", target)
    assert code == 2 and "inside the input org/tiny-llama" in err
    assert not target.exists()


def test_merge_of_hub_ids_copies_the_config_from_the_snapshot(hub, run_cli, tmp_path):
    code, _, err = run_cli(
        "merge",
        "--base",
        "org/tiny-llama",
        "org/tiny-llama@v1",
        "--method",
        "task-arithmetic",
        "-o",
        tmp_path / "merged",
    )
    assert code == 0, err
    assert (tmp_path / "merged" / "config.json").is_file()


_OPENED: list[str] | None = None  # while a list, the audit hook records every path opened


def _audit(event: str, args: tuple) -> None:
    if _OPENED is not None and event in ("open", "os.open") and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)  # hooks cannot be removed: this one records only inside `opened()`


@contextlib.contextmanager
def opened():
    global _OPENED
    _OPENED = []
    try:
        yield _OPENED
    finally:
        _OPENED = None


def _repo(cache: Path, name: str, ref: str | None = MAIN) -> Path:
    return hub_repo(cache, name, ref)


def _hostile_layouts(cache: Path, outside: Path) -> list[str]:
    """Cache folders that lead out of their repository in every way we know: the IDs."""
    _repo(cache, "refs-up", "../../../outside")
    _repo(cache, "refs-abs", str(outside))
    (_repo(cache, "snapshot-link") / "snapshots" / MAIN).symlink_to(outside)
    snapshot = _repo(cache, "file-link") / "snapshots" / MAIN
    snapshot.mkdir()
    for f in outside.iterdir():
        (snapshot / f.name).symlink_to(f)
    storage = _repo(cache, "blobs-link")
    (storage / "blobs").rmdir()
    (storage / "blobs").symlink_to(outside)
    (storage / "snapshots" / MAIN).mkdir()
    for f in outside.iterdir():
        (storage / "snapshots" / MAIN / f.name).symlink_to(f"../../blobs/{f.name}")
    shutil.copytree(outside, _repo(cache, "not-a-commit", "v1") / "snapshots" / "v1")
    snapshot = _repo(cache, "tagged-by-commit", None) / "snapshots" / V1
    snapshot.symlink_to(outside)
    return [
        "org/refs-up",
        "org/refs-abs",
        "org/snapshot-link",
        "org/file-link",
        "org/blobs-link",
        "org/not-a-commit",
        f"org/tagged-by-commit@{V1}",
    ]


def test_hostile_cache_layouts_are_refused_and_nothing_outside_is_opened(hub, zoo, tmp_path, run_cli):
    outside = tmp_path / "outside"
    shutil.copytree(zoo["llama_ft"], outside)
    ids = _hostile_layouts(hub, outside)
    real_outside = os.path.realpath(outside)
    for hub_id in ids:
        with opened() as paths:
            code, _, err = run_cli(
                "merge", "--method", "task-arithmetic", "--base", zoo["llama"], hub_id, "-o", outside / "merged"
            )
        assert code == 2 and "Hub cache" in err and len(err.strip().splitlines()) == 1, (hub_id, err)
        # (the output's own staging folder, made and removed beside it, is the only thing written there)
        leaked = [p for p in paths if os.path.realpath(p).startswith(real_outside) and ".partial" not in p]
        assert not leaked, (hub_id, leaked)
        assert not (outside / "merged").exists()
        with pytest.raises(CorruptCheckpoint):
            open_checkpoint(hub_id)


def test_the_output_check_sees_the_real_files_of_its_inputs(zoo, tmp_path, run_cli):
    """A model folder whose weights are a link to another folder: that file is an input too."""
    shutil.copytree(zoo["llama_ft"], tmp_path / "real")
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "model.safetensors").symlink_to(tmp_path / "real" / "model.safetensors")
    shutil.copy(zoo["llama_ft"] / "config.json", tmp_path / "linked" / "config.json")
    before = (tmp_path / "real" / "model.safetensors").read_bytes()
    code, _, err = run_cli(
        "spectrum", zoo["llama"], tmp_path / "linked", "--json", tmp_path / "real" / "model.safetensors", "--force"
    )
    assert code == 2 and "is the input" in err
    assert (tmp_path / "real" / "model.safetensors").read_bytes() == before


def test_the_good_layout_of_huggingface_hub_still_opens(hub, zoo, tmp_path):
    """Blobs and relative links, as huggingface_hub writes them: inside the repository, so accepted."""
    storage = _repo(hub, "blob-layout")
    snapshot = storage / "snapshots" / MAIN
    snapshot.mkdir()
    for f in zoo["llama"].iterdir():
        (storage / "blobs" / f"sha-{f.name}").write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(f"../../blobs/sha-{f.name}")
    assert set(open_checkpoint("org/blob-layout").names()) == set(open_checkpoint(zoo["llama"]).names())


@pytest.fixture()
def gguf_hub(tmp_path, monkeypatch):
    """org/tiny-gguf: a repository of GGUF files only, as TheBloke's or bartowski's are."""
    from conftest import GGUF_FIXTURES
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    source = tmp_path / "repo"
    source.mkdir()
    for kind in ("Q4_K_M", "Q8_0"):
        shutil.copy(GGUF_FIXTURES / f"llama.{kind}.gguf", source / f"tiny-llama.{kind}.gguf")
    _publish(cache, "org/tiny-gguf", MAIN, source)
    return cache


def test_a_gguf_file_of_a_hub_repository_is_named_by_its_quantization_or_its_name(gguf_hub):
    from conftest import GGUF_FIXTURES

    for given in ("org/tiny-gguf:Q4_K_M", "org/tiny-gguf:q4_k_m", "org/tiny-gguf:tiny-llama.Q4_K_M.gguf"):
        ckpt = open_checkpoint(given)
        assert ckpt.path.name == "tiny-llama.Q4_K_M.gguf"
        name = "model.layers.0.self_attn.q_proj.weight"
        assert (ckpt.get(name) == open_checkpoint(GGUF_FIXTURES / "llama.Q4_K_M.gguf").get(name)).all()
    assert open_checkpoint("org/tiny-gguf@" + MAIN + ":Q8_0").path.name == "tiny-llama.Q8_0.gguf"


def test_a_gguf_repository_without_a_file_named_is_refused_with_the_way_to_name_one(gguf_hub, run_cli):
    code, _, err = run_cli("inspect", "org/tiny-gguf")
    assert code == 2 and "org/tiny-gguf:Q4_K_M" in err, err
    code, _, err = run_cli("inspect", "org/tiny-gguf:Q")
    assert code == 2 and "matches 2 GGUF files" in err, err
    code, _, err = run_cli("inspect", "org/tiny-gguf:Q5_K_M")
    assert code == 2 and "no GGUF file matching 'Q5_K_M'" in err, err
