"""Calibration text for data-aware merges (`--calibration FILE`): read safely, checked, fingerprinted.

A file holds one text per line (blank lines skipped), or, named `*.jsonl`, one JSON object per
line with a "text" string. Its SHA-256 goes into the merge record, so that replaying the record
refuses a file that changed since.

Memory is bounded whatever the file holds: it is read a chunk at a time, each text keeps its first
`MAX_TEXT_CHARS` characters (a model runs on 128 tokens of it, `activations.MAX_TOKENS`), a JSONL
line may hold `MAX_JSONL_LINE` bytes, and a file `MAX_TEXTS` texts and `MAX_CALIBRATION_BYTES` bytes.
"""

from __future__ import annotations

import codecs
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from weightlab.errors import CheckpointNotFound, InvalidArgument
from weightlab.io.files import NotARegularFile, regular_chunks

MAX_CALIBRATION_BYTES = 64 << 20  # a calibration set is a few hundred texts, not a corpus
MAX_TEXTS = 100_000  # each text is a forward pass
MAX_TEXT_CHARS = 1 << 16  # kept of each text: 128 tokens span far fewer characters
MAX_JSONL_LINE = 4 << 20  # a JSON object must be read whole to find its "text"


@dataclass(frozen=True)
class CalibrationSet:
    path: str
    texts: tuple[str, ...]
    sha256: str


class _Lines:
    """A file's lines, decoded incrementally, each cut to its first `keep` characters; the longest
    line's length in characters is kept to refuse what cannot be cut (a JSONL object)."""

    def __init__(self, keep: int):
        self.keep = keep
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.current: list[str] = []
        self.kept = 0
        self.length = 0
        self.lines: list[tuple[str, int]] = []  # (kept text, full length in characters)

    def feed(self, data: bytes, final: bool = False) -> None:
        text = self.decoder.decode(data, final)
        parts = text.split("\n")
        for i, part in enumerate(parts):
            if self.kept < self.keep:
                piece = part[: self.keep - self.kept]
                self.current.append(piece)
                self.kept += len(piece)
            self.length += len(part)
            if i < len(parts) - 1 or (final and (self.current or self.length)):
                self.lines.append(("".join(self.current).rstrip("\r"), self.length))
                self.current, self.kept, self.length = [], 0, 0


def read_calibration(path: str | Path, expected_sha256: str | None = None) -> CalibrationSet:
    """The texts of one calibration file; one line naming the file for anything else (missing,
    not a regular file, not UTF-8 text, binary, empty, a JSONL line without a "text" string, too
    large, or not the file the record was made with)."""
    where = str(path)
    if not Path(path).exists():
        raise CheckpointNotFound("--calibration: no such file", where)
    jsonl = where.endswith(".jsonl")
    lines = _Lines(MAX_JSONL_LINE if jsonl else MAX_TEXT_CHARS)
    digest = hashlib.sha256()
    try:
        for chunk in regular_chunks(path, MAX_CALIBRATION_BYTES):
            digest.update(chunk)
            if b"\x00" in chunk:
                raise InvalidArgument("--calibration is binary, not text (it holds NUL bytes)", where)
            lines.feed(chunk)
            if len(lines.lines) > MAX_TEXTS:
                raise InvalidArgument(
                    f"--calibration holds more than {MAX_TEXTS} lines; a calibration set is a few hundred "
                    "texts: give a sample",
                    where,
                )
        lines.feed(b"", final=True)
    except NotARegularFile as e:
        raise InvalidArgument(f"--calibration must be a regular text file of at most 64 MiB ({e})", where) from None
    except UnicodeDecodeError as e:
        raise InvalidArgument(f"--calibration is not UTF-8 text ({e.reason})", where) from None
    except OSError as e:
        raise InvalidArgument(f"--calibration cannot be read ({e.strerror or e})", where) from None
    if expected_sha256 is not None and digest.hexdigest() != expected_sha256:
        raise InvalidArgument(
            "this calibration file changed since the merge record was written (its SHA-256 differs)", where
        )
    if jsonl:
        texts = [
            _jsonl_text(line, length, i + 1, where) for i, (line, length) in enumerate(lines.lines) if line.strip()
        ]
    else:
        texts = [t.strip() for line, _ in lines.lines for t in line.splitlines() if t.strip()]
    if not texts:
        raise InvalidArgument("--calibration holds no text", where)
    if len(texts) > MAX_TEXTS:
        raise InvalidArgument(f"--calibration holds more than {MAX_TEXTS} texts; give a sample", where)
    return CalibrationSet(where, tuple(texts), digest.hexdigest())


def _jsonl_text(line: str, length: int, number: int, where: str) -> str:
    if length > MAX_JSONL_LINE:
        raise InvalidArgument(f"line {number} holds more than {MAX_JSONL_LINE >> 20} Mi characters", where)
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, RecursionError):
        raise InvalidArgument(f"line {number} is not JSON (a .jsonl file holds one object per line)", where) from None
    text = record.get("text") if isinstance(record, dict) else None
    if not isinstance(text, str) or not text.strip():
        raise InvalidArgument(f'line {number} has no "text" string', where)
    return text.strip()[:MAX_TEXT_CHARS]


def calibration_sets(paths: list[str], models: int, expected: list[str] | None = None) -> list[CalibrationSet]:
    """One set per model: one file for all, or one file per model, in the models' order."""
    if len(paths) not in (1, models):
        raise InvalidArgument(
            f"--calibration was given {len(paths)} times for {models} models: give one file for all, or one per model"
        )
    sets = [read_calibration(p, expected[i] if expected else None) for i, p in enumerate(paths)]
    return sets * models if len(sets) == 1 else sets
