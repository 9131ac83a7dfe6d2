"""Merge recipes read from YAML, in our vocabulary (`config.read_ours`) or mergekit's
(`mergekit.read_recipe`, told apart by its `merge_method` key), as options for `config.build_config`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from weightlab.errors import CheckpointNotFound, InvalidArgument
from weightlab.io.yaml_file import read_yaml
from weightlab.merging.config import read_ours
from weightlab.merging.mergekit import read_recipe


def recipe_options(data: Any, path: str | Path) -> dict[str, Any]:
    """A recipe's data (ours or mergekit's) as options for `build_config`."""
    if not isinstance(data, dict):
        raise InvalidArgument("a merge config is a mapping of keys to values", path)
    return read_recipe(data, path) if "merge_method" in data else read_ours(data, path)


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML merge config as options for `build_config` (mergekit's format too). Every
    value's type is checked here; its domain when the config is built."""
    if not Path(path).exists():
        raise CheckpointNotFound("--config: no such file", path)
    return recipe_options(read_yaml(path), path)
