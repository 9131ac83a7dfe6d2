"""Shared fixtures: tiny seeded models of three families written by transformers, real brief
fine-tunes, planted changes, PEFT adapters and corrupt files. Built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

# Nothing in the tests may reach the Hugging Face Hub; set before huggingface_hub reads it.
os.environ["HF_HUB_OFFLINE"] = "1"

import atexit
import shutil
import tempfile

# The suite leaves the user's home alone: every process of it (xdist workers too) gets its own
# temporary home and cache, set before anything reads them. The real cache is remembered (once,
# by the first process) so that the session can check at its end that nothing there changed.
os.environ.setdefault(
    "WEIGHTLAB_TESTS_REAL_CACHE",
    str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "weightlab"),
)
TEST_HOME = Path(tempfile.mkdtemp(prefix="weightlab-tests-home-"))
atexit.register(shutil.rmtree, TEST_HOME, ignore_errors=True)
os.environ["HOME"] = str(TEST_HOME)
os.environ["XDG_CACHE_HOME"] = str(TEST_HOME / ".cache")
os.environ["WEIGHTLAB_CACHE"] = str(TEST_HOME / ".cache" / "weightlab" / "decompositions")

import json
import re
import struct

import numpy as np
import pytest
import torch

from weightlab import synthetic
from weightlab.cli import main


@pytest.fixture(scope="session", autouse=True)
def decomposition_cache(tmp_path_factory) -> Path:
    """Every run in the tests caches base decompositions in a temporary folder, never in ~/.cache."""
    folder = tmp_path_factory.mktemp("decompositions")
    os.environ["WEIGHTLAB_CACHE"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> dict[str, Path]:
    """Paths of every checkpoint layout the tests use."""
    root = tmp_path_factory.mktemp("zoo")
    paths: dict[str, Path] = {}
    for family in synthetic.FAMILIES:
        base = synthetic.tiny_model(family, seed=0)
        paths[family] = synthetic.save(base, root / family)
        ft = synthetic.finetune(synthetic.tiny_model(family, seed=0), steps=5, seed=1)
        paths[f"{family}_ft"] = synthetic.save(ft, root / f"{family}_ft")
    llama = synthetic.tiny_model("llama", seed=0)
    paths["llama_sharded"] = synthetic.save(llama, root / "llama_sharded", max_shard_size="20KB")
    paths["llama_bin"] = root / "llama_bin" / "pytorch_model.bin"
    paths["llama_bin"].parent.mkdir()
    torch.save(llama.state_dict(), paths["llama_bin"])
    return paths


@pytest.fixture(scope="session")
def adapters(zoo, tmp_path_factory) -> dict[str, Path]:
    """PEFT LoRA adapters with non-zero B (init_lora_weights=False), saved by PEFT itself."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("adapters")
    specs = {
        "llama": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
        "llama_rslora_pattern": (
            "llama",
            dict(
                r=4,
                lora_alpha=8,
                use_rslora=False,
                target_modules=["q_proj", "o_proj"],
                rank_pattern={"o_proj": 2},
                alpha_pattern={"layers.1.self_attn.q_proj": 3},
            ),
        ),
        "llama_rslora": ("llama", dict(r=4, lora_alpha=16, use_rslora=True, target_modules=["k_proj", "embed_tokens"])),
        "gpt2": ("gpt2", dict(r=4, lora_alpha=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
        "bert": ("bert", dict(r=2, lora_alpha=4, target_modules=["query", "value"])),
    }
    paths = {}
    for key, (family, kwargs) in specs.items():
        torch.manual_seed(5)
        model = synthetic.tiny_model(family, seed=0)
        peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **kwargs))
        peft_model.save_pretrained(root / key)
        paths[key] = root / key
    return paths


@pytest.fixture(scope="session")
def corrupt(tmp_path_factory, zoo) -> dict[str, Path]:
    """Broken files, each with the error it must produce."""
    root = tmp_path_factory.mktemp("corrupt")
    good = (zoo["bert"] / "model.safetensors").read_bytes()
    files = {}
    files["truncated"] = root / "truncated.safetensors"
    files["truncated"].write_bytes(good[: len(good) - 100])
    files["garbage_header"] = root / "garbage.safetensors"
    files["garbage_header"].write_bytes(struct.pack("<Q", 16) + b"{not json at all" + b"\0" * 64)
    files["header_too_long"] = root / "header_too_long.safetensors"
    files["header_too_long"].write_bytes(struct.pack("<Q", 10_000) + b"{}")
    files["tiny"] = root / "tiny.safetensors"
    files["tiny"].write_bytes(b"abc")
    shard_dir = root / "missing_shard"
    shard_dir.mkdir()
    index = json.loads((zoo["llama_sharded"] / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    for shard in shards[:-1]:
        (shard_dir / shard).write_bytes((zoo["llama_sharded"] / shard).read_bytes())
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    files["missing_shard"] = shard_dir
    files["not_a_checkpoint"] = root / "notes.txt"
    files["not_a_checkpoint"].write_text("hello")
    files["empty_dir"] = root / "empty"
    files["empty_dir"].mkdir()
    return files


def hub_repo(cache: Path, name: str, ref: str | None) -> Path:
    """An empty Hub cache folder of org/NAME (refs, snapshots, blobs) whose refs/main holds `ref`."""
    storage = cache / f"models--org--{name}"
    for sub in ("refs", "snapshots", "blobs"):
        (storage / sub).mkdir(parents=True)
    if ref is not None:
        (storage / "refs" / "main").write_text(ref)
    return storage


def exit_code(args: list[str]) -> int:
    """Run the CLI in-process and return its exit code (output is left to the caller's capture)."""
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        return e.code
    return 0


@pytest.fixture()
def run_cli(capsys):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        code = 0
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


GGUF_FIXTURES = Path(__file__).parent / "fixtures" / "gguf"


def write_gguf(path: Path, tensors: dict[str, np.ndarray], arch: str = "llama", quant: dict | None = None) -> Path:
    """A GGUF file written by llama.cpp's own `gguf` package: a two-head llama block by default;
    `quant` maps a tensor name to the GGML type its float32 values are quantized to by gguf."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_embedding_length(next(iter(tensors.values())).shape[-1])
    for name, values in tensors.items():
        kind = (quant or {}).get(name)
        if kind is None:
            writer.add_tensor(name, values)
        else:
            qtype = gguf.GGMLQuantizationType[kind]
            writer.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def patch_gguf_tensor(
    path: Path, name: str, *, dims: list[int] | None = None, type_id: int | None = None, offset: int | None = None
) -> None:
    """Rewrite one entry of a GGUF tensor table in place (a lying shape, an unknown type, a far offset)."""
    data = bytearray(path.read_bytes())
    key = struct.pack("<Q", len(name)) + name.encode()
    at = data.index(key) + len(key)
    (n_dims,) = struct.unpack_from("<I", data, at)
    if dims is not None:
        assert len(dims) == n_dims
        struct.pack_into(f"<{n_dims}Q", data, at + 4, *dims)
    after = at + 4 + 8 * n_dims
    if type_id is not None:
        struct.pack_into("<I", data, after, type_id)
    if offset is not None:
        struct.pack_into("<Q", data, after + 4, offset)
    path.write_bytes(bytes(data))


def requantized(source: Path, dest: Path, kind: str) -> Path:
    """A copy of a GGUF file (metadata and all) whose matrices gguf's own quantizer turns into
    `kind` (Q8_0, Q4_0, Q5_1, …: its ports of ggml's reference quantizers); norms stay F32."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    writer = gguf.GGUFWriter(str(dest), reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub_type)
    qtype = gguf.GGMLQuantizationType[kind]
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        if values.ndim == 2 and values.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0:
            writer.add_tensor(tensor.name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(tensor.name, values.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dest


# The merge method NAN (its registry key is `nan`) is a name, not a value: where a report names it.
NAN_METHOD = re.compile(r"Merge: nan\b|data-key='merge\.method' data-v='nan'>nan\b|\| method \| nan \||--method nan\b")


def shown_nan(html: str) -> list[str]:
    """Where a report shows a value that is not a number ('nan', 'NaN', 'inf', 'Infinity') to a
    reader: its text and attributes, images and scripts aside. A figure that was not computed must
    say so instead."""
    text = re.sub(r"<(script|style)\b.*?</\1>", " ", html, flags=re.S | re.I)
    text = re.sub(r"data:[^'\"\s)]+", " ", text)
    text = NAN_METHOD.sub(" ", text)
    return [m.group(0) for m in re.finditer(r".{0,40}(?<![\w-])-?(nan|NaN|inf|Inf|Infinity)(?![\w-]).{0,40}", text)]


def _files_under(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under a folder: its size and modification time, by relative path."""
    if not folder.is_dir():
        return {}
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file() and not p.is_symlink()
    }


@pytest.fixture(scope="session", autouse=True)
def leaves_the_users_cache_alone_and_shows_no_nan(tmp_path_factory):
    """At the end of the session (each xdist worker checks its own share): the user's real
    weightlab cache is as it was, and no report the suite wrote (HTML or Markdown, anywhere under
    the session's temporary folders) shows 'nan' or 'inf'."""
    real_cache = Path(os.environ["WEIGHTLAB_TESTS_REAL_CACHE"])
    before = _files_under(real_cache)
    yield
    changed = sorted(set(before.items()) ^ set(_files_under(real_cache).items()))
    assert not changed, f"the tests changed the user's cache {real_cache}: {[name for name, _ in changed][:10]}"
    shown = {
        str(path): found
        for path in sorted(tmp_path_factory.getbasetemp().rglob("*"))
        if path.suffix in (".html", ".md") and path.is_file()
        for found in [shown_nan(path.read_text(errors="replace"))]
        if found
    }
    assert not shown, f"reports that show nan or inf: {shown}"
