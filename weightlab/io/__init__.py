"""Checkpoints in and out: lazy readers, matching across checkpoints, atomic writers."""

from weightlab.io.adapter import AdaptedCheckpoint, LoraAdapter, LoraModule
from weightlab.io.checkpoint import Checkpoint, ModelConfig, open_checkpoint
from weightlab.io.safetensors_file import TensorInfo
from weightlab.io.writer import CheckpointWriter

__all__ = [
    "AdaptedCheckpoint", "Checkpoint", "CheckpointWriter", "LoraAdapter", "LoraModule",
    "ModelConfig", "TensorInfo", "open_checkpoint",
]
