"""Hub model IDs resolve through a Hugging Face cache laid out offline; nothing touches the network."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

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
    for not_an_id in ("model.safetensors", "./org/name", "/abs/path", "a/b/c", "org/", "org/name@", "org/..",
                      "org/name@../../etc", "org/name@refs//x", "org/name@/abs"):
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
    assert json.loads((tmp_path / "hub.json").read_text())["matrices"] == \
        json.loads((tmp_path / "local.json").read_text())["matrices"]


def test_an_id_missing_from_the_offline_cache_is_one_line_exit_2(hub, run_cli):
    code, out, err = run_cli("inspect", "org/absent")
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
    code, _, err = run_cli("merge", "--base", "org/tiny-llama", "org/tiny-llama@v1", "--method", "task-arithmetic",
                           "-o", tmp_path / "merged")
    assert code == 0, err
    assert (tmp_path / "merged" / "config.json").is_file()
