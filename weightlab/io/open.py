"""Open any model: dense weights or a PEFT adapter (alone or applied to a base), by path, Hub ID,
or held in memory (a torch module, a PEFT model, a mapping of names to tensors; `io.memory`)."""

from __future__ import annotations

from pathlib import Path

from weightlab.errors import InvalidArgument
from weightlab.io.adapter import AdaptedCheckpoint, LoraAdapter
from weightlab.io.checkpoint import Checkpoint, SafetensorsCheckpoint, open_dense
from weightlab.io.gguf_checkpoint import GGUFCheckpoint, gguf_file_of
from weightlab.io.hub import locate
from weightlab.io.memory import open_in_memory
from weightlab.io.quantized import quantized_view
from weightlab.io.sources import Source


def open_checkpoint(path: Source) -> Checkpoint | LoraAdapter:
    """A `Checkpoint` for dense weights (one safetensors file, a sharded folder with an index, a
    Hugging Face folder, a GGUF file, quantized safetensors (`io.quantized`), a legacy
    `.bin`/`.pt`, a module or a mapping in memory) or a
    `LoraAdapter` for a PEFT adapter folder or a PEFT model. `path` may also be a Hub model ID,
    `org/name[@revision]` (a local path wins). Reads headers only."""
    if not isinstance(path, (str, Path)):
        opened: Checkpoint | LoraAdapter = open_in_memory(path)
        return opened
    path = locate(path)
    if path.is_dir() and (path / "adapter_config.json").is_file():
        return LoraAdapter(path)
    gguf = gguf_file_of(path)
    if gguf is not None:
        return GGUFCheckpoint(gguf)
    dense = open_dense(path)
    return quantized_view(dense) if isinstance(dense, SafetensorsCheckpoint) else dense


def open_finetuned(path: Source, base: Checkpoint) -> Checkpoint:
    """A fine-tuned checkpoint, or an adapter applied to `base`: either way, weights W'."""
    opened = open_checkpoint(path)
    return AdaptedCheckpoint(base, opened) if isinstance(opened, LoraAdapter) else opened


def open_weights(path: Source) -> Checkpoint:
    """A checkpoint of full weights (a base model): an adapter alone is refused."""
    opened = open_checkpoint(path)
    if isinstance(opened, LoraAdapter):
        raise InvalidArgument(
            "this is a LoRA adapter, not full weights: give it as a fine-tune of the model it adapts "
            "(with --base, or after the base)",
            path if isinstance(path, (str, Path)) else opened.path,
        )
    return opened
