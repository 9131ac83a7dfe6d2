"""Writing: sharded output that transformers loads, atomic on failure, no overwrite without force."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModel

from weightlab.errors import OutputExists
from weightlab.io import CheckpointWriter, open_checkpoint
from weightlab.io.atomic import write_text
from weightlab.io.writer import parse_size


def copy_checkpoint(src, dest, **kwargs):
    ckpt = open_checkpoint(src)
    with CheckpointWriter(dest, donor=src, **kwargs) as writer:
        for name in ckpt.names():
            writer.add(name, ckpt.get(name))
    return ckpt


def test_sharded_write_has_an_index_and_loads_in_transformers(zoo, tmp_path):
    src = copy_checkpoint(zoo["llama"], tmp_path / "out", shard_size="30KB", metadata={"made_by": "test"})
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert (out / "config.json").is_file()
    written = open_checkpoint(out)
    assert written.metadata["made_by"] == "test"
    assert index["metadata"]["total_size"] == sum(src.info(n).nbytes for n in src.names())
    reloaded = AutoModel.from_pretrained(out).state_dict()
    for name in src.names():
        assert torch.equal(reloaded[name], src.get(name))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left over


def test_small_model_is_one_file_without_index(zoo, tmp_path):
    copy_checkpoint(zoo["bert"], tmp_path / "one")
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == [
        ".weightlab-output",
        "config.json",
        "model.safetensors",
    ]


def test_interrupted_write_leaves_nothing_under_the_final_name(zoo, tmp_path):
    ckpt = open_checkpoint(zoo["llama"])
    with pytest.raises(RuntimeError, match="disk on fire"):
        with CheckpointWriter(tmp_path / "out", shard_size="10KB") as writer:
            for i, name in enumerate(ckpt.names()):
                writer.add(name, ckpt.get(name))
                if i == 10:  # several shards are already on disk at this point
                    raise RuntimeError("disk on fire")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused_without_force_and_replaced_with_it(zoo, tmp_path):
    copy_checkpoint(zoo["bert"], tmp_path / "out")
    before = (tmp_path / "out" / "model.safetensors").read_bytes()
    with pytest.raises(OutputExists, match="--force"):
        copy_checkpoint(zoo["gpt2"], tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == before
    copy_checkpoint(zoo["gpt2"], tmp_path / "out", force=True)
    assert "h.0.attn.c_attn.weight" in open_checkpoint(tmp_path / "out").names()


def test_text_outputs_are_atomic_and_respect_force(tmp_path):
    path = tmp_path / "r.json"
    write_text(path, "one")
    with pytest.raises(OutputExists):
        write_text(path, "two")
    write_text(path, "two", force=True)
    assert path.read_text() == "two"


def test_same_tensors_give_identical_bytes(zoo, tmp_path):
    copy_checkpoint(zoo["llama"], tmp_path / "a", shard_size="30KB")
    copy_checkpoint(zoo["llama"], tmp_path / "b", shard_size="30KB")
    for f in (tmp_path / "a").iterdir():
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes(), f.name


@pytest.mark.parametrize(
    "text, size", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2MiB", 2 * 1024**2), ("1000", 1000)]
)
def test_sizes_parse(text, size):
    assert parse_size(text) == size


def test_our_safetensors_files_read_back_with_the_reference_library(tmp_path):
    from safetensors import safe_open

    from weightlab.io.safetensors_file import write_safetensors

    tensors = {
        "b": torch.randn(3, 5).to(torch.bfloat16),
        "a": torch.arange(7),
        "m": torch.tensor([True, False]),
        "e": torch.zeros(0, 4),
        "f8": torch.randn(4).to(torch.float8_e4m3fn),
    }
    write_safetensors(tmp_path / "x.safetensors", tensors, {"z": "1", "a": "2"})
    with safe_open(tmp_path / "x.safetensors", "pt") as f:
        assert f.metadata() == {"z": "1", "a": "2"}
        for name, t in tensors.items():
            assert (
                torch.equal(f.get_tensor(name).view(torch.uint8), t.view(torch.uint8))
                if t.numel()
                else f.get_tensor(name).shape == t.shape
            )


def test_a_failed_commit_puts_every_earlier_output_back(tmp_path):
    from weightlab.errors import OutputConflict
    from weightlab.io.outputs import Output, OutputPlan

    (tmp_path / "a.json").write_text("old a\n")
    with pytest.raises(OutputConflict):
        with OutputPlan(
            [], [Output("--json", tmp_path / "a.json"), Output("--csv", tmp_path / "b.csv")], force=True
        ) as plan:
            plan.write_text("--json", "new a\n")
            plan.write_text("--csv", "new b\n")
            (tmp_path / "b.csv").mkdir()  # appears meanwhile: --force may not replace a folder with a file
    assert (tmp_path / "a.json").read_text() == "old a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.csv"]  # no staging folder left


def test_an_error_names_the_users_output_not_its_staging_folder(tmp_path):
    from weightlab.errors import NonFiniteTensor
    from weightlab.io.outputs import Output, OutputPlan

    out = tmp_path / "merged"
    with pytest.raises(NonFiniteTensor) as refused:
        with OutputPlan([], [Output("-o", out, directory=True)], force=False) as plan:
            raise NonFiniteTensor("1 of 4 values are NaN or Inf", plan.path("-o"), "w")
    assert refused.value.path == str(out) and str(refused.value).startswith(f"{out}: tensor 'w'")
    with pytest.raises(OSError) as full:
        with OutputPlan([], [Output("-o", out, directory=True)], force=False) as plan:
            raise OSError(28, "No space left on device", str(plan.path("-o") / "model.safetensors"))
    assert full.value.filename == str(out / "model.safetensors")
    assert list(tmp_path.iterdir()) == []
