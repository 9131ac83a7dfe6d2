"""Checkpoints in and out: lazy readers, PEFT adapters, atomic writers."""

from weightlab.io.adapter import AdaptedCheckpoint, LoraAdapter, LoraModule
from weightlab.io.checkpoint import Checkpoint
from weightlab.io.open import open_checkpoint, open_finetuned, open_weights
from weightlab.io.safetensors_file import TensorInfo
from weightlab.io.writer import CheckpointWriter
from weightlab.model_config import ModelConfig

__all__ = [
    "AdaptedCheckpoint", "Checkpoint", "CheckpointWriter", "LoraAdapter", "LoraModule",
    "ModelConfig", "TensorInfo", "open_checkpoint", "open_finetuned", "open_weights",
]
