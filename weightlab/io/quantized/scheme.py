"""What a quantization format module provides: a `Scheme` that finds each quantized matrix's
stored tensors (`Group`) and decodes them, registered by its `quant_method`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from weightlab.errors import CorruptCheckpoint
from weightlab.io.checkpoint import SafetensorsCheckpoint


@dataclass(frozen=True)
class Group:
    """The stored tensors of one quantized matrix: `parts` (role -> stored name), the matrix's
    Hugging Face `name` and `shape`, and what a read returns (`dtype`)."""

    name: str
    parts: dict[str, str]
    shape: tuple[int, ...]
    dtype: torch.dtype
    format: str
    settings: dict[str, Any]


class Scheme:
    """One quantization format. Subclasses set `method` and implement `groups` and `decode`."""

    method: str  # quantization_config.quant_method (or MLX's config key)

    def __init__(self, settings: dict[str, Any], ckpt: SafetensorsCheckpoint):
        self.settings = settings
        self.ckpt = ckpt

    def groups(self) -> list[Group]:
        raise NotImplementedError

    def decode(self, parts: dict[str, torch.Tensor], group: Group) -> torch.Tensor:
        raise NotImplementedError

    def refuse(self, message: str, tensor: str | None = None) -> CorruptCheckpoint:
        return CorruptCheckpoint(f"{self.method}: {message}", self.ckpt.path, tensor)

    def stored(self, prefix: str, roles: dict[str, str]) -> dict[str, str]:
        """role -> stored name for the names `prefix + suffix` present (`roles`: role -> suffix)."""
        return {role: prefix + suffix for role, suffix in roles.items() if prefix + suffix in self.ckpt}

    def shape_of(self, name: str) -> tuple[int, ...]:
        return tuple(self.ckpt.info(name).shape)


SCHEMES: dict[str, Callable[[dict[str, Any], SafetensorsCheckpoint], Scheme]] = {}


def register(method: str) -> Callable[[type[Scheme]], type[Scheme]]:
    def add(cls: type[Scheme]) -> type[Scheme]:
        cls.method = method
        SCHEMES[method] = cls
        return cls

    return add
