"""Checkpoint reading: every layout lists and reads exactly what transformers/safetensors see."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModel

from weightlab.errors import (
    CheckpointNotFound,
    CorruptCheckpoint,
    MissingShard,
    NotACheckpoint,
    ShapeMismatch,
    UnsafePickle,
)
from weightlab.io import AdaptedCheckpoint, LoraAdapter, open_checkpoint, open_finetuned
from weightlab.io.checkpoint import SafetensorsCheckpoint, TorchCheckpoint


def reference_listing(folder):
    """Names, shapes and dtypes as the safetensors library reports them, over all shards."""
    listing = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for name in f.keys():
                t = f.get_slice(name)
                listing[name] = (tuple(t.get_shape()), t.get_dtype())
    return listing


@pytest.mark.parametrize("key", ["llama", "bert", "gpt2", "llama_sharded"])
def test_every_safetensors_layout_lists_like_the_safetensors_library(zoo, key):
    ckpt = open_checkpoint(zoo[key])
    expected = reference_listing(zoo[key])
    assert {n: (ckpt.info(n).shape, ckpt.info(n).dtype) for n in ckpt.names()} == expected
    assert ckpt.bytes_read == 0  # listing reads headers only


def test_sharded_folder_really_has_several_shards_and_reads_the_same_tensors(zoo):
    sharded, single = open_checkpoint(zoo["llama_sharded"]), open_checkpoint(zoo["llama"])
    assert isinstance(sharded, SafetensorsCheckpoint) and len(sharded.files) > 2
    assert sorted(sharded.names()) == sorted(single.names())
    for name in single.names():
        assert torch.equal(sharded.get(name), single.get(name)), name


def test_index_file_and_single_file_open_directly(zoo):
    by_index = open_checkpoint(zoo["llama_sharded"] / "model.safetensors.index.json")
    by_file = open_checkpoint(zoo["bert"] / "model.safetensors")
    assert len(by_index) == len(open_checkpoint(zoo["llama"]))
    assert by_file.config is not None and by_file.config.model_type == "bert"


@pytest.mark.parametrize("family", ["llama", "bert", "gpt2"])
def test_tensors_equal_the_state_dict_transformers_loads(zoo, family):
    model = AutoModel.from_pretrained(zoo[family])
    state = model.state_dict()
    ckpt = open_checkpoint(zoo[family])
    assert ckpt.config.num_layers == 2
    for name in ckpt.names():
        assert torch.equal(ckpt.get(name), state[name]), name


def test_legacy_bin_loads_through_the_safe_loader_and_matches_safetensors(zoo):
    legacy = open_checkpoint(zoo["llama_bin"])
    modern = open_checkpoint(zoo["llama"])
    assert isinstance(legacy, TorchCheckpoint)
    assert sorted(legacy.names()) == sorted(modern.names())
    for name in modern.names():
        assert legacy.info(name).dtype == modern.info(name).dtype
        assert torch.equal(legacy.get(name), modern.get(name))


class _Payload:
    """Unpickling this would run os.system: the safe loader must refuse before that."""

    def __reduce__(self):
        return (os.system, ("touch /tmp/weightlab-pwned",))


def test_pickle_with_code_is_refused_and_never_executed(tmp_path):
    path = tmp_path / "evil.bin"
    with open(path, "wb") as f:
        pickle.dump({"w": _Payload()}, f)
    if os.path.exists("/tmp/weightlab-pwned"):
        os.remove("/tmp/weightlab-pwned")
    with pytest.raises(UnsafePickle, match=r"evil\.bin"):
        open_checkpoint(path)
    assert not os.path.exists("/tmp/weightlab-pwned")


def test_get_upcasts_low_precision_floats_but_leaves_integers(tmp_path):
    from safetensors.torch import save_file

    save_file(
        {
            "w": torch.randn(4, 4).to(torch.bfloat16),
            "f8": torch.randn(3, 3).to(torch.float8_e4m3fn),
            "ids": torch.arange(5),
        },
        tmp_path / "m.safetensors",
    )
    ckpt = open_checkpoint(tmp_path / "m.safetensors")
    assert ckpt.info("f8").dtype == "F8_E4M3"
    assert ckpt.get("w", dtype=torch.float32).dtype == torch.float32
    assert ckpt.get("f8", dtype=torch.float32).dtype == torch.float32
    assert ckpt.get("ids", dtype=torch.float32).dtype == torch.int64


def test_reading_one_tensor_materialises_exactly_its_bytes(zoo, monkeypatch):
    """Measure bytes pulled from storage, per tensor, while walking the whole checkpoint."""
    import weightlab.io.safetensors_file as sf

    pulled = []
    real_preadv = os.preadv
    monkeypatch.setattr(sf.os, "preadv", lambda fd, bufs, off: pulled.append(real_preadv(fd, bufs, off)) or pulled[-1])
    ckpt = open_checkpoint(zoo["llama_sharded"])
    biggest = max(ckpt.info(n).nbytes for n in ckpt.names())
    for name in ckpt.names():
        pulled.clear()
        tensor = ckpt.get(name)
        assert sum(pulled) == ckpt.info(name).nbytes == tensor.numel() * tensor.element_size()
        assert sum(pulled) <= biggest
    assert ckpt.bytes_read == sum(ckpt.info(n).nbytes for n in ckpt.names())


def test_walking_a_checkpoint_keeps_memory_bounded_by_the_largest_tensor(tmp_path):
    """RSS while walking a 400 MB checkpoint grows by a few tensors (8 MB each), not the model."""
    import gc

    import psutil
    from safetensors.torch import save_file

    tensors = {f"layers.{i}.w": torch.full((1024, 2048), float(i)) for i in range(50)}  # 8 MB each
    save_file(tensors, tmp_path / "big.safetensors")
    del tensors
    gc.collect()
    process = psutil.Process()
    ckpt = open_checkpoint(tmp_path / "big.safetensors")
    start = process.memory_info().rss
    peak = start
    total = 0.0
    for name in ckpt.names():
        total += float(ckpt.get(name)[0, 0])
        peak = max(peak, process.memory_info().rss)
    assert total == sum(range(50))
    assert peak - start < 3 * 8 * 1024 * 1024


def test_adapter_exposes_factors_and_scale(adapters):
    adapter = open_checkpoint(adapters["llama_rslora_pattern"])
    assert isinstance(adapter, LoraAdapter)
    o = adapter.modules["layers.0.self_attn.o_proj"]
    q1 = adapter.modules["layers.1.self_attn.q_proj"]
    q0 = adapter.modules["layers.0.self_attn.q_proj"]
    assert (o.rank, o.scale) == (2, 8 / 2)  # rank_pattern
    assert (q1.rank, q1.scale) == (4, 3 / 4)  # alpha_pattern
    assert (q0.rank, q0.scale) == (4, 8 / 4)
    a, b, s = adapter.factors("layers.0.self_attn.o_proj")
    assert a.shape == (2, 32) and b.shape == (32, 2) and s == 4.0


@pytest.mark.parametrize("key", ["llama", "llama_rslora_pattern", "llama_rslora", "gpt2", "bert"])
def test_adapter_delta_equals_what_peft_merge_and_unload_adds(zoo, adapters, key):
    from peft import PeftModel

    family = key.split("_")[0]
    base_state = {k: v.clone() for k, v in AutoModel.from_pretrained(zoo[family]).state_dict().items()}
    merged = PeftModel.from_pretrained(AutoModel.from_pretrained(zoo[family]), adapters[key]).merge_and_unload()
    merged_state = merged.state_dict()
    adapted = open_finetuned(adapters[key], open_checkpoint(zoo[family]))
    assert isinstance(adapted, AdaptedCheckpoint) and adapted.module_of
    changed = 0
    for name in adapted.names():
        ours = adapted.get(name, dtype=torch.float32)
        torch.testing.assert_close(ours, merged_state[name].float(), rtol=1e-5, atol=1e-6, msg=name)
        changed += not torch.equal(merged_state[name], base_state[name])
    assert changed == len(adapted.module_of)


def test_adapter_for_another_base_is_a_shape_mismatch(zoo, adapters, tmp_path):
    from weightlab import synthetic

    wider = synthetic.save(synthetic.tiny_model("llama", hidden=48), tmp_path / "wide")
    with pytest.raises(ShapeMismatch, match="another base"):
        open_finetuned(adapters["llama"], open_checkpoint(wider))


@pytest.mark.parametrize(
    "case, error, text",
    [
        ("truncated", CorruptCheckpoint, "truncated"),
        ("garbage_header", CorruptCheckpoint, "not valid JSON"),
        ("header_too_long", CorruptCheckpoint, "larger than the file"),
        ("tiny", CorruptCheckpoint, "shorter than"),
        ("missing_shard", MissingShard, "missing shard"),
        ("not_a_checkpoint", NotACheckpoint, "not a .safetensors"),
        ("empty_dir", NotACheckpoint, "no weights found"),
    ],
)
def test_corrupt_inputs_raise_their_own_error(corrupt, case, error, text):
    with pytest.raises(error, match=text) as info:
        open_checkpoint(corrupt[case])
    assert str(corrupt[case]) in str(info.value)


def test_missing_path_is_checkpoint_not_found(tmp_path):
    with pytest.raises(CheckpointNotFound):
        open_checkpoint(tmp_path / "nope.safetensors")


def test_nan_and_inf_are_read_as_stored(tmp_path):
    from safetensors.torch import save_file

    save_file({"bad": torch.tensor([[float("nan"), float("inf")], [1.0, -float("inf")]])}, tmp_path / "nan.safetensors")
    t = open_checkpoint(tmp_path / "nan.safetensors").get("bad")
    assert torch.isnan(t[0, 0]) and torch.isinf(t[0, 1]) and t[1, 0] == 1
