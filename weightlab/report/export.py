"""JSON and CSV for machines: every command's `--json FILE` / `--csv FILE` (`-` is stdout)."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from weightlab.io.atomic import write_text


def _clean(value: Any) -> Any:
    """JSON has no NaN/Inf: write them as null so every parser reads the file."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def to_json(payload: dict) -> str:
    return json.dumps(_clean(payload), indent=2, allow_nan=False) + "\n"


def to_csv(rows: Iterable[dict]) -> str:
    rows = list(rows)
    out = io.StringIO()
    if rows:
        columns = list(dict.fromkeys(k for row in rows for k in row))
        writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in row.items()})
    return out.getvalue()


def write_outputs(
    payload: dict, rows: Iterable[dict], json_path: str | Path | None, csv_path: str | Path | None, force: bool
) -> None:
    if json_path:
        write_text(json_path, to_json(payload), force)
    if csv_path:
        write_text(csv_path, to_csv(rows), force)
