"""A GGUF model (one file, or the shards of llama.cpp's gguf-split) as a `Checkpoint`: Hugging
Face names and shapes, the values llama.cpp's converter was given, one tensor read at a time.

Quantized tensors read as float32 (`ggml_quants.decode`), unquantized ones as stored (F32, F16,
BF16); `TensorInfo.stored` says how each is stored and at how many bits per weight. The config
comes from the metadata (`gguf_names.hf_config`), so the analyses know layers and heads.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from weightlab.errors import CorruptCheckpoint, NotACheckpoint
from weightlab.io.checkpoint import Checkpoint
from weightlab.io.ggml_quants import decode, read_dtype
from weightlab.io.gguf_file import GGUFFile, GGUFTensor, is_gguf
from weightlab.io.gguf_names import (
    ARCHITECTURES,
    Architecture,
    hf_config,
    hf_name,
    is_derived,
    known_architectures,
    unpermute_rows,
)
from weightlab.io.safetensors_file import CODE_OF_TORCH_DTYPE, StoredAs, TensorInfo
from weightlab.model_config import model_config_from_dict

SHARD = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")  # gguf-split's names
WEIGHTS = (
    "*.safetensors",
    "*.safetensors.index.json",
    "pytorch_model.bin",
    "*.bin.index.json",
    "model.pt",
    "model.pth",
)


def gguf_file_of(path: Path) -> Path | None:
    """The GGUF file `path` names: the file itself when its content is GGUF (whatever its name), or
    a folder's one .gguf (the first shard of a split model) when it holds no other weights."""
    if path.is_file():
        return path if is_gguf(path) else None
    if not path.is_dir() or any(next(path.glob(pattern), None) for pattern in WEIGHTS):
        return None
    files = sorted(p for p in path.glob("*.gguf") if not (m := SHARD.match(p.name)) or int(m["no"]) == 1)
    if len(files) > 1:
        shown = ", ".join(p.name for p in files[:4]) + (", …" if len(files) > 4 else "")
        raise NotACheckpoint(f"{len(files)} GGUF files ({shown}): give the one to read", path)
    return files[0] if files else None


class GGUFCheckpoint(Checkpoint):
    """A GGUF model read lazily (`path`: the file, or the first shard of a split model)."""

    config_in_file = False  # the metadata holds the config: outputs write it as config.json

    def __init__(self, path: Path):
        self.files = [GGUFFile(p) for p in _shards(Path(path))]
        meta = self.files[0].metadata
        arch_name = meta.get("general.architecture")
        if not isinstance(arch_name, str):
            raise NotACheckpoint("GGUF file has no general.architecture", path)
        if arch_name not in ARCHITECTURES:
            raise NotACheckpoint(
                f"GGUF architecture {arch_name!r} has no Hugging Face mapping in weightlab "
                f"(it maps {known_architectures()})",
                path,
            )
        arch = ARCHITECTURES[arch_name]
        self.architecture = arch
        self.derived: list[str] = []  # RoPE factors llama.cpp stores: computed from the config by HF
        self._gguf: dict[str, tuple[GGUFFile, GGUFTensor]] = {}
        infos: dict[str, TensorInfo] = {}
        for file in self.files:
            for t in file.tensors.values():
                if is_derived(t.name):
                    self.derived.append(t.name)
                    continue
                name = hf_name(arch, t.name)
                if name is None:
                    raise NotACheckpoint(
                        f"tensor {t.name!r} has no Hugging Face name in a {arch_name} model", file.path
                    )
                if name in infos:
                    raise CorruptCheckpoint("tensor appears in two shards", file.path, t.name)
                dtype = read_dtype(t.type)
                stored = StoredAs(t.type.name, t.type.bits_per_weight, t.nbytes) if t.type.quantized else None
                nbytes = t.nbytes // t.type.size * t.type.block * dtype.itemsize
                infos[name] = TensorInfo(name, t.shape, CODE_OF_TORCH_DTYPE[dtype], file.path, t.offset, nbytes, stored)
                self._gguf[name] = (file, t)
        tied = "lm_head.weight" not in infos
        raw = hf_config(arch_name, arch, meta, tied)
        self._heads = _heads(meta, arch_name, arch, path)
        super().__init__(Path(path), model_config_from_dict(raw))
        self.metadata = meta
        self.__infos = infos

    @property
    def _infos(self) -> dict[str, TensorInfo]:
        return self.__infos

    def _read(self, info: TensorInfo) -> torch.Tensor:
        file, t = self._gguf[info.name]
        values = decode(file.read(t), t.type, file.path, t.name).reshape(info.shape)
        return self._as_hf(info.name, values)

    def _read_rows(self, info: TensorInfo, start: int, stop: int, into: torch.Tensor | None) -> torch.Tensor:
        if self._row_order_changed(info.name) or len(info.shape) < 2:
            return self._read(info)[start:stop].clone()
        file, t = self._gguf[info.name]
        row_bytes = t.nbytes // info.shape[0]  # every row is whole blocks
        raw = file.read(t, start * row_bytes, (stop - start) * row_bytes)
        return self._as_hf(info.name, decode(raw, t.type, file.path, t.name).reshape(stop - start, *info.shape[1:]))

    def _row_order_changed(self, name: str) -> bool:
        return self.architecture.permuted_qk and name.endswith(
            ("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")
        )

    def _as_hf(self, name: str, values: torch.Tensor) -> torch.Tensor:
        """The values as the Hugging Face model holds them (`gguf_names`: Q/K rows, Gemma norms)."""
        if self._row_order_changed(name):
            q_heads, kv_heads = self._heads
            values = unpermute_rows(values, q_heads if ".q_proj." in name else kv_heads)
        if self.architecture.norm_offset and name.endswith("norm.weight"):
            values = values - self.architecture.norm_offset
        return values


def _heads(meta: dict[str, Any], arch_name: str, arch: Architecture, path: Path) -> tuple[int, int]:
    """(query heads, key/value heads) for undoing the Q/K permutation."""
    if not arch.permuted_qk:
        return 0, 0
    heads = meta.get(f"{arch_name}.attention.head_count")
    kv = meta.get(f"{arch_name}.attention.head_count_kv", heads)
    if not isinstance(heads, int) or not isinstance(kv, int) or heads < 1 or kv < 1:
        raise CorruptCheckpoint(
            f"GGUF {arch_name}.attention.head_count(_kv) is {heads!r}/{kv!r}: "
            "the Q and K rows cannot be put back in order",
            path,
        )
    return heads, kv


def _shards(path: Path) -> list[Path]:
    """The files of a model: `path` alone, or every shard of gguf-split's `NAME-0000i-of-0000n.gguf`."""
    match = SHARD.match(path.name)
    if not match:
        return [path]
    count = int(match["count"])
    if int(match["no"]) != 1:
        raise NotACheckpoint(f"shard {int(match['no'])} of {count}: give the first shard", path)
    shards = [path.with_name(f"{match['prefix']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [s.name for s in shards if not s.is_file()]
    if missing:
        raise CorruptCheckpoint(f"shard {missing[0]} of this split GGUF model is missing", path)
    return shards
