"""GGUF files read as Hugging Face checkpoints, checked against llama.cpp's own tools: files made
by its converter (`convert_hf_to_gguf.py`) and quantizer (`llama-quantize`) from tiny models made
by transformers (tests/fixtures/gguf/make_fixtures.py), its `gguf` package's dequantizer, and
transformers' own GGUF loader."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import GGUF_FIXTURES, exit_code, patch_gguf_tensor, requantized, write_gguf

import weightlab as wl
from weightlab.errors import NotACheckpoint
from weightlab.io import open_checkpoint
from weightlab.io.ggml_quants import decode
from weightlab.io.gguf_file import GGML_TYPES

gguf = pytest.importorskip("gguf")

ARCHITECTURES = ["llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3"]
QUANTIZED = ["Q4_K_M", "Q8_0", "Q2_K", "IQ4_XS"]
CONFIG_FACTS = [
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "tie_word_embeddings",
]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_converters_file_reads_back_as_the_model_it_was_made_from(arch):
    """Names, shapes, Q/K row order (llama's permutation, with grouped K heads), Gemma's norms
    stored as 1 + w, fused Phi-3 matrices, tied embeddings: every value exactly as transformers
    saved it."""
    ours = open_checkpoint(GGUF_FIXTURES / f"{arch}.bf16.gguf")
    original = open_checkpoint(GGUF_FIXTURES / arch)
    assert sorted(ours.names()) == sorted(original.names())
    for name in original.names():
        assert ours.info(name).shape == original.info(name).shape, name
        assert torch.equal(ours.get(name, dtype=torch.float32), original.get(name, dtype=torch.float32)), name
    config = json.loads((GGUF_FIXTURES / arch / "config.json").read_text())
    config.setdefault("tie_word_embeddings", True)
    assert {k: ours.config.raw[k] for k in CONFIG_FACTS} == {k: config[k] for k in CONFIG_FACTS}
    assert ours.config.num_layers == config["num_hidden_layers"]


def test_rows_are_read_alone_and_in_hugging_face_order():
    ckpt = open_checkpoint(GGUF_FIXTURES / "llama.bf16.gguf")
    for name in ["model.layers.1.self_attn.k_proj.weight", "model.layers.0.mlp.down_proj.weight"]:
        whole = ckpt.get(name)
        assert torch.equal(ckpt.get_rows(name, 3, 70), whole[3:70])


@pytest.mark.parametrize("kind", [t for t in GGML_TYPES.values() if t.quantized], ids=lambda t: t.name)
def test_every_quantized_type_decodes_exactly_as_llama_cpps_reader(kind):
    """Our kernels (and the fallback through gguf) against gguf-py's dequantizer, value for value:
    blocks made by gguf's quantizer where it has one, else random bytes (every bit pattern,
    non-finite scales included, must decode the same)."""
    qtype = gguf.GGMLQuantizationType(kind.id)
    rng = np.random.default_rng(kind.id)
    rows, cols = 6, 2 * max(kind.block, 256)
    try:
        raw = gguf.quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32), qtype)
    except NotImplementedError:
        raw = rng.integers(0, 256, (rows, cols // kind.block * kind.size), dtype=np.uint8)
    with np.errstate(all="ignore"):
        expected = torch.from_numpy(gguf.quants.dequantize(raw, qtype))
    ours = decode(raw.reshape(-1), kind).reshape(rows, cols)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0, equal_nan=True)


def test_large_tensors_decode_in_chunks_the_same(monkeypatch):
    import weightlab.io.ggml_quants as quants

    kind = next(t for t in GGML_TYPES.values() if t.name == "Q4_K")
    raw = np.random.default_rng(0).integers(0, 256, 9 * kind.size, dtype=np.uint8)  # nine blocks
    whole = decode(raw.reshape(-1), kind)
    monkeypatch.setattr(quants, "CHUNK_VALUES", 700)  # 2 blocks per chunk, the last one short
    torch.testing.assert_close(decode(raw.reshape(-1), kind), whole, rtol=0, atol=0, equal_nan=True)


def test_a_file_is_known_by_its_content_and_a_folder_by_its_one_gguf(tmp_path):
    renamed = tmp_path / "weights.bin"
    shutil.copy(GGUF_FIXTURES / "qwen2.bf16.gguf", renamed)
    assert type(open_checkpoint(renamed)).__name__ == "GGUFCheckpoint"
    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copy(GGUF_FIXTURES / "qwen2.bf16.gguf", folder / "model.gguf")
    assert len(open_checkpoint(folder).names()) == len(open_checkpoint(renamed).names())
    shutil.copy(GGUF_FIXTURES / "qwen3.bf16.gguf", folder / "other.gguf")
    with pytest.raises(NotACheckpoint, match="2 GGUF files"):
        open_checkpoint(folder)


def test_inspect_names_each_tensors_format_and_bits(run_cli):
    code, out, _ = run_cli("inspect", GGUF_FIXTURES / "llama.bf16.gguf", "--json", "-")
    assert code == 0
    rows = {t["name"]: t for t in json.loads(out)["tensors"]}
    assert rows["model.layers.0.self_attn.q_proj.weight"]["dtype"] == "BF16"
    assert rows["model.layers.0.self_attn.q_proj.weight"]["bits_per_weight"] == 16
    assert rows["model.norm.weight"]["dtype"] == "F32"


def _tiny(tmp_path, name="t.gguf", **kw):
    rng = np.random.default_rng(0)
    tensors = {
        "token_embd.weight": rng.standard_normal((8, 64)).astype(np.float32),
        "blk.0.attn_q.weight": rng.standard_normal((64, 64)).astype(np.float32),
    }
    return write_gguf(tmp_path / name, tensors, quant={"blk.0.attn_q.weight": "Q8_0"}, **kw)


def test_a_file_written_by_gguf_reads_back_within_q8_0s_error(tmp_path):
    path = _tiny(tmp_path)
    ckpt = open_checkpoint(path)
    q = ckpt.get("model.layers.0.self_attn.q_proj.weight")
    assert ckpt.info("model.layers.0.self_attn.q_proj.weight").stored.format == "Q8_0"
    assert ckpt.info("model.layers.0.self_attn.q_proj.weight").stored.bits_per_weight == 8.5
    assert q.dtype == torch.float32 and q.shape == (64, 64)


def _hostile(tmp_path, change):
    path = _tiny(tmp_path)
    change(path)
    return path


HOSTILE = {
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:-1000]), "the file is truncated or the shape is wrong"),
    "lying shape": (lambda p: patch_gguf_tensor(p, "blk.0.attn_q.weight", dims=[64, 6400]), "needs bytes"),
    "offset past the end": (lambda p: patch_gguf_tensor(p, "blk.0.attn_q.weight", offset=1 << 40), "needs bytes"),
    "unknown type": (lambda p: patch_gguf_tensor(p, "blk.0.attn_q.weight", type_id=99), "GGML type 99"),
    "misaligned offset": (lambda p: patch_gguf_tensor(p, "blk.0.attn_q.weight", offset=3), "not a multiple"),
    "overlapping tensors": (lambda p: patch_gguf_tensor(p, "blk.0.attn_q.weight", offset=0), "overlap"),
    "rows not whole blocks": (lambda p: patch_gguf_tensor(p, "blk.0.attn_q.weight", dims=[48, 64]), "blocks of 32"),
    "version 1": (lambda p: p.write_bytes(p.read_bytes()[:4] + b"\x01\0\0\0" + p.read_bytes()[8:]), "version 1"),
    "big-endian": (lambda p: p.write_bytes(p.read_bytes()[:4] + b"\0\0\0\x03" + p.read_bytes()[8:]), "big-endian"),
    "header cut": (lambda p: p.write_bytes(p.read_bytes()[:100]), "GGUF header is truncated"),
    "absurd counts": (
        lambda p: p.write_bytes(p.read_bytes()[:8] + b"\xff" * 16 + p.read_bytes()[24:]),
        "more than the file holds",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE), ids=str)
def test_a_hostile_gguf_is_refused_in_one_line_naming_file_and_tensor(case, tmp_path, capsys):
    change, message = HOSTILE[case]
    path = _hostile(tmp_path, change)
    assert exit_code(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0] and str(path) in lines[0], err
    if case in {"truncated", "lying shape", "offset past the end", "unknown type", "rows not whole blocks"}:
        assert "blk.0.attn_q.weight" in lines[0]


def test_an_architecture_without_a_mapping_is_refused_by_name(tmp_path):
    path = _tiny(tmp_path, arch="mamba")
    with pytest.raises(NotACheckpoint, match="architecture 'mamba' has no Hugging Face mapping"):
        open_checkpoint(path)


def test_a_tensor_without_a_mapping_is_refused_by_name(tmp_path):
    path = write_gguf(tmp_path / "t.gguf", {"blk.0.attn_zz.weight": np.zeros((4, 32), np.float32)})
    with pytest.raises(NotACheckpoint, match=r"'blk\.0\.attn_zz\.weight' has no Hugging Face name"):
        open_checkpoint(path)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_merge_of_gguf_files_loads_in_transformers_as_the_original_model(arch, tmp_path):
    """config.json comes from the metadata: the merged folder is the model transformers made, to the
    last logit (the average of a model with itself is the model)."""
    from transformers import AutoModelForCausalLM

    source = GGUF_FIXTURES / f"{arch}.bf16.gguf"
    report = wl.merge(None, [source, source], method="average", out=tmp_path / "merged")
    assert report.dequantized == {}  # bfloat16 is not a quantization
    original = AutoModelForCausalLM.from_pretrained(GGUF_FIXTURES / arch, dtype=torch.float32).eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(original(ids).logits, merged(ids).logits)


def test_a_merge_of_quantized_files_says_what_it_dequantized(tmp_path):
    q8 = requantized(GGUF_FIXTURES / "llama.bf16.gguf", tmp_path / "q8.gguf", "Q8_0")
    q4 = requantized(GGUF_FIXTURES / "llama.bf16.gguf", tmp_path / "q4.gguf", "Q4_0")
    report = wl.merge(None, [q8, q4], method="average", out=tmp_path / "merged")
    assert report.dequantized == {str(q8): "Q8_0", str(q4): "Q4_0"}
    record = json.loads((tmp_path / "merged" / "weightlab_merge.json").read_text())
    assert record["dequantized_inputs"] == {str(q8): "Q8_0", str(q4): "Q4_0"}
    merged = open_checkpoint(tmp_path / "merged")
    name = "model.layers.0.mlp.up_proj.weight"
    assert merged.info(name).dtype == "F32" and merged.info(name).stored is None  # full precision, never re-quantized
    expected = (open_checkpoint(q8).get(name) + open_checkpoint(q4).get(name)) / 2
    torch.testing.assert_close(merged.get(name), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", QUANTIZED)
def test_llama_quantize_files_read_as_transformers_gguf_loader_reads_them(kind):
    """Files made by llama.cpp's llama-quantize (K-quants, Q8_0, IQ4_XS, mixed per tensor), read
    by transformers' own GGUF loader: the same tensors, value for value."""
    from transformers import AutoModelForCausalLM

    theirs = AutoModelForCausalLM.from_pretrained(GGUF_FIXTURES, gguf_file=f"llama.{kind}.gguf", dtype=torch.float32)
    ours = open_checkpoint(GGUF_FIXTURES / f"llama.{kind}.gguf")
    state = theirs.state_dict()
    assert sorted(ours.names()) == sorted(state)
    for name in ours.names():
        assert torch.equal(ours.get(name, dtype=torch.float32), state[name]), name


# ‖Q − W‖/‖W‖ of Gaussian weights per storage format (measured: 0.53%, 1.8%, 7.1%, 7.7%, 15%, 30%)
FORMAT_ERROR = {
    "Q8_0": (0.003, 0.008),
    "Q6_K": (0.01, 0.03),
    "Q4_K": (0.05, 0.09),
    "IQ4_XS": (0.05, 0.1),
    "Q3_K": (0.1, 0.2),
    "Q2_K": (0.2, 0.4),
}


@pytest.mark.parametrize("kind", QUANTIZED)
def test_quantized_files_hold_the_original_within_the_formats_error(kind):
    """The converter's HF → GGUF round trip through llama-quantize: names, Q/K order and shapes
    back, every matrix within its format's relative error of the original."""
    ours = open_checkpoint(GGUF_FIXTURES / f"llama.{kind}.gguf")
    original = open_checkpoint(GGUF_FIXTURES / "llama")
    for name in original.names():
        w, q = original.get(name, dtype=torch.float32), ours.get(name, dtype=torch.float32)
        error = float((q - w).norm() / w.norm())
        if ours.info(name).stored is None:  # norms stay float32
            assert error == 0, name
        else:
            low, high = FORMAT_ERROR[ours.info(name).stored.format]
            assert low < error < high, (name, ours.info(name).stored.format, error)
