"""Calibration text for data-aware merges (`--calibration FILE`): read safely, checked, fingerprinted.

A file holds one text per line (blank lines skipped), or, named `*.jsonl`, one JSON object per
line with a "text" string. Its SHA-256 goes into the merge record, so that replaying the record
refuses a file that changed since.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from weightlab.errors import CheckpointNotFound, InvalidArgument
from weightlab.io.files import NotARegularFile, read_regular

MAX_CALIBRATION_BYTES = 256 << 20  # a calibration set is a few hundred texts, not a corpus


@dataclass(frozen=True)
class CalibrationSet:
    path: str
    texts: tuple[str, ...]
    sha256: str


def read_calibration(path: str | Path, expected_sha256: str | None = None) -> CalibrationSet:
    """The texts of one calibration file; one line naming the file for anything else (missing,
    not a regular file, not UTF-8 text, binary, empty, a JSONL line without a "text" string, or
    not the file the record was made with)."""
    where = str(path)
    if not Path(path).exists():
        raise CheckpointNotFound("--calibration: no such file", where)
    try:
        data = read_regular(path, MAX_CALIBRATION_BYTES)
    except NotARegularFile as e:
        raise InvalidArgument(f"--calibration must be a regular text file ({e})", where) from None
    except OSError as e:
        raise InvalidArgument(f"--calibration cannot be read ({e.strerror or e})", where) from None
    digest = hashlib.sha256(data).hexdigest()
    if expected_sha256 is not None and digest != expected_sha256:
        raise InvalidArgument(
            "this calibration file changed since the merge record was written (its SHA-256 differs)", where
        )
    if b"\x00" in data:
        raise InvalidArgument("--calibration is binary, not text (it holds NUL bytes)", where)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidArgument(f"--calibration is not UTF-8 text (byte {e.start})", where) from None
    lines = [line.strip() for line in text.splitlines()]
    if where.endswith(".jsonl"):
        texts = [_jsonl_text(line, i + 1, where) for i, line in enumerate(lines) if line]
    else:
        texts = [line for line in lines if line]
    if not texts:
        raise InvalidArgument("--calibration holds no text", where)
    return CalibrationSet(where, tuple(texts), digest)


def _jsonl_text(line: str, number: int, where: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        raise InvalidArgument(f"line {number} is not JSON (a .jsonl file holds one object per line)", where) from None
    text = record.get("text") if isinstance(record, dict) else None
    if not isinstance(text, str) or not text.strip():
        raise InvalidArgument(f'line {number} has no "text" string', where)
    return text.strip()


def calibration_sets(paths: list[str], models: int, expected: list[str] | None = None) -> list[CalibrationSet]:
    """One set per model: one file for all, or one file per model, in the models' order."""
    if len(paths) not in (1, models):
        raise InvalidArgument(
            f"--calibration was given {len(paths)} times for {models} models: give one file for all, or one per model"
        )
    sets = [read_calibration(p, expected[i] if expected else None) for i, p in enumerate(paths)]
    return sets * models if len(sets) == 1 else sets
