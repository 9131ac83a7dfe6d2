"""Checkpoints in and out: lazy readers, PEFT adapters, atomic writers.

The names below load on first use: `weightlab.io.outputs`, `hub`, `index` and `files` stay free
of numerical libraries, so the command line can plan outputs and refuse bad input at once.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "AdaptedCheckpoint": "adapter",
    "LoraAdapter": "adapter",
    "LoraModule": "adapter",
    "Checkpoint": "checkpoint",
    "CheckpointWriter": "writer",
    "TensorInfo": "safetensors_file",
    "open_checkpoint": "open",
    "open_finetuned": "open",
    "open_weights": "open",
}
__all__ = [*_HOMES, "ModelConfig"]


def __getattr__(name: str) -> Any:
    if name == "ModelConfig":
        from weightlab.model_config import ModelConfig

        return ModelConfig
    if name in _HOMES:
        return getattr(importlib.import_module(f"weightlab.io.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'weightlab.io' has no attribute {name!r}")
