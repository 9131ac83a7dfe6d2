"""The few facts of a model's `config.json` the analyses use (a leaf module: imports no weightlab I/O)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from weightlab.errors import CorruptCheckpoint

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


@dataclass(frozen=True)
class ModelConfig:
    """The few facts of `config.json` the analyses use."""

    model_type: str | None
    num_layers: int | None
    tie_word_embeddings: bool
    raw: dict = field(repr=False, default_factory=dict)


def read_model_config(folder: Path) -> ModelConfig | None:
    """Read `config.json` beside the weights; transformers resolves per-family key aliases."""
    path = folder / "config.json"
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CorruptCheckpoint("config.json is not valid JSON", path) from None
    if not isinstance(raw, dict):
        raise CorruptCheckpoint("config.json is not a JSON object", path)
    return model_config_from_dict(raw)


def model_config_from_dict(raw: dict) -> ModelConfig:
    """The facts of a config's dictionary (`config.json`, or an in-memory model's `config.to_dict()`)."""
    num_layers = next((raw[k] for k in LAYER_COUNT_KEYS if isinstance(raw.get(k), int)), None)
    if num_layers is None and "model_type" in raw:
        try:  # rarer families: transformers knows their alias for the layer count
            from transformers import AutoConfig

            num_layers = getattr(AutoConfig.for_model(**raw), "num_hidden_layers", None)
        except Exception:
            num_layers = None
    return ModelConfig(raw.get("model_type"), num_layers, bool(raw.get("tie_word_embeddings", True)), raw)
