"""Sharded checkpoints' index files: a `weight_map` of plain file names, confined to its folder.

No numerical library here: the Hub resolver reads indexes before any weight is opened.
"""

from __future__ import annotations

import json
from pathlib import Path

from weightlab.errors import CorruptCheckpoint, MissingShard


def read_weight_map(index: Path) -> dict[str, str]:
    """An index's `weight_map`: an object whose every value is a plain file name in the index's
    folder (`shard_name`), whatever JSON the file holds instead (lists, numbers, null, objects)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError, RecursionError):
        raise CorruptCheckpoint("index is not valid JSON with a 'weight_map' object", index) from None
    if not isinstance(weight_map, dict):
        raise CorruptCheckpoint("index 'weight_map' is not an object", index)
    for name, shard in weight_map.items():
        shard_name(shard, index, name)
    return weight_map


def shard_name(shard: object, index: Path, tensor: str) -> str:
    """`shard` when it is a plain file name (a non-empty string, no folder part, no traversal)."""
    if (
        not isinstance(shard, str)
        or not shard
        or shard in (".", "..")
        or "/" in shard
        or "\\" in shard
        or "\0" in shard
    ):
        raise CorruptCheckpoint(
            f"index names shard {shard!r}, which is not a plain file name in its folder", index, tensor
        )
    return shard


def shard_path(folder: Path, shard: str, index: Path, tensor: str) -> Path:
    """The file an index names, confined to the index's folder: a `shard_name`, and no symbolic
    link leading out of the folder (except, in a Hugging Face cache snapshot, into that
    repository's `blobs/`, where the cache keeps the real files)."""
    path = folder / shard_name(shard, index, tensor)
    if not path.is_file():
        raise MissingShard(f"index names missing shard {shard}", index, tensor)
    real, home = path.resolve(), folder.resolve()
    allowed = [home]
    if home.parent.name == "snapshots":
        allowed.append(home.parent.parent / "blobs")
    if not any(real.parent == root or root in real.parents for root in allowed):
        raise CorruptCheckpoint(
            f"shard {shard} is a link that leads out of the index's folder (to {real})", index, tensor
        )
    return path
