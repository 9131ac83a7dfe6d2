"""Quantized safetensors checkpoints (GPTQ, AWQ, bitsandbytes, FP8, compressed-tensors, MLX) as
`Checkpoint`s of plain weights: each quantized matrix is one tensor under its Hugging Face name,
decoded to the values its own library's dequantizer gives, one matrix at a time.

A format is one module here with a `Scheme`: it says, from the config, whether a checkpoint is its
own (`of_config`), which stored tensors make up each quantized matrix (`groups`), and how they
decode (`decode`). `quantized_view` wraps a safetensors checkpoint whose config names one.
"""

from __future__ import annotations

import importlib
import math

import torch

from weightlab.errors import CorruptCheckpoint, NotACheckpoint
from weightlab.io.checkpoint import Checkpoint, SafetensorsCheckpoint
from weightlab.io.quantized.scheme import SCHEMES, Group, Scheme
from weightlab.io.safetensors_file import CODE_OF_TORCH_DTYPE, StoredAs, TensorInfo

FORMATS = ("gptq", "awq", "bnb", "fp8", "compressed", "mlx")


class QuantizedCheckpoint(Checkpoint):
    """A safetensors checkpoint whose quantized matrices read as plain weights (`Scheme`)."""

    def __init__(self, inner: SafetensorsCheckpoint, scheme: Scheme):
        super().__init__(inner.path, inner.config)
        self.inner, self.scheme = inner, scheme
        self._groups: dict[str, Group] = {}
        consumed: set[str] = set()
        infos: dict[str, TensorInfo] = {}
        for group in scheme.groups():
            if group.name in self._groups:
                raise CorruptCheckpoint("two quantized forms of one matrix", inner.path, group.name)
            self._groups[group.name] = group
            consumed.update(group.parts.values())
            parts = [inner.info(n) for n in group.parts.values()]
            stored_bytes = sum(p.nbytes for p in parts)
            numel = math.prod(group.shape)
            infos[group.name] = TensorInfo(
                group.name,
                group.shape,
                CODE_OF_TORCH_DTYPE[group.dtype],
                parts[0].file,
                -1,
                numel * group.dtype.itemsize,
                StoredAs(group.format, 8 * stored_bytes / numel if numel else 0.0, stored_bytes),
            )
        for name in inner.names():
            if name not in consumed:
                if name in infos:
                    raise CorruptCheckpoint("is both a stored tensor and a quantized matrix", inner.path, name)
                infos[name] = inner.info(name)
        self.__infos = dict(sorted(infos.items()))

    @property
    def _infos(self) -> dict[str, TensorInfo]:
        return self.__infos

    def _read(self, info: TensorInfo) -> torch.Tensor:
        group = self._groups.get(info.name)
        if group is None:
            return self.inner._read(self.inner.info(info.name))
        parts = {role: self.inner._read(self.inner.info(n)) for role, n in group.parts.items()}
        values = self.scheme.decode(parts, group)
        if tuple(values.shape) != group.shape:  # a bug here, never the user's: say which matrix
            raise CorruptCheckpoint(f"decoded to {list(values.shape)}, not {list(group.shape)}", self.path, info.name)
        return values.to(group.dtype)

    def _read_rows(self, info: TensorInfo, start: int, stop: int, into: torch.Tensor | None) -> torch.Tensor:
        if info.name in self._groups:
            return self._read(info)[start:stop].clone()
        return self.inner._read_rows(self.inner.info(info.name), start, stop, into)


def quantized_view(ckpt: SafetensorsCheckpoint) -> Checkpoint:
    """`ckpt` itself, or its quantized matrices read as weights when its config names a format:
    `quantization_config.quant_method` (transformers) or `quantization` (MLX)."""
    for module in FORMATS:  # each registers its scheme
        importlib.import_module(f"weightlab.io.quantized.{module}")

    raw = ckpt.config.raw if ckpt.config is not None else {}
    settings = raw.get("quantization_config")
    if isinstance(settings, dict):
        method = str(settings.get("quant_method", "")).lower()
    elif isinstance(raw.get("quantization"), dict):
        settings, method = raw["quantization"], "mlx"
    else:
        return ckpt
    if method not in SCHEMES:
        raise NotACheckpoint(
            f"config.json's quantization_config names {method!r}, which weightlab does not read "
            f"(it reads {', '.join(sorted(SCHEMES))})",
            ckpt.path,
        )
    return QuantizedCheckpoint(ckpt, SCHEMES[method](settings, ckpt))
