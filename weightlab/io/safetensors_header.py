"""The safetensors header, accepted exactly when the reference library (`safetensors` 0.8, Rust)
accepts it, and otherwise refused with a message naming the file and the tensor.

Format: 8-byte little-endian length N ≤ 100,000,000, then N bytes of UTF-8 JSON
`{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str} | null}`, then the
data. The reference parses the JSON with serde into typed structs, so besides valid JSON it
requires: integers that are unsigned 64-bit (no `-0`, `1e0`, `2.0`, `true`), known dtype codes,
no duplicate field inside an entry nor a second `__metadata__` (a repeated tensor name: the last
wins), nesting shallower than 128, no lone UTF-16 surrogate escapes, no NaN/Infinity. Its
validation then sorts entries by offset and requires them to tile the data exactly: each begins
where the previous ends, its size is numel × bits / 8 (whole bytes, no overflow), and the last
ends at the end of the file. `tests/test_safetensors_fuzz.py` checks every verdict against the
library on mutated files.
"""

from __future__ import annotations

import json
import math
from typing import Any

from weightlab.errors import CorruptCheckpoint, shown

MAX_HEADER_BYTES = 100_000_000  # the reference's MAX_HEADER_SIZE
MAX_DEPTH = 127  # serde_json's recursion limit: 128 nested containers are refused
U64 = 2**64

# safetensors dtype code -> bits per element (the reference's list, in its order)
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}
ENTRY_FIELDS = ("dtype", "shape", "data_offsets")


class _Pairs(list[tuple[str, Any]]):
    """A JSON object as its (key, value) pairs, so repeated keys stay visible."""


def _neg_zero_is_float(text: str) -> int | float:
    # serde reads "-0" as the float -0.0, which is no unsigned integer
    return -0.0 if text.lstrip("-").strip("0") == "" and text.startswith("-") else int(text)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def parse_header(raw: bytes, path: Any) -> tuple[dict[str, tuple[str, tuple[int, ...], int, int]], dict[str, str]]:
    """{name: (dtype, shape, begin, end)} and the metadata, from the header's JSON bytes."""
    try:
        text = raw.decode("utf-8")
        tree = json.loads(text, object_pairs_hook=_Pairs, parse_int=_neg_zero_is_float, parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise CorruptCheckpoint("header is not valid UTF-8", path) from None
    except (ValueError, RecursionError) as e:
        raise CorruptCheckpoint(f"header is not valid JSON ({str(e).splitlines()[0][:80]})", path) from None
    _check_depth_and_strings(tree, path)
    if not isinstance(tree, _Pairs):
        raise CorruptCheckpoint("header is not a JSON object", path)
    entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    metadata: dict[str, str] | None = None
    seen_metadata = False
    for name, entry in tree:
        if name == "__metadata__":
            if seen_metadata:
                raise CorruptCheckpoint("header has two __metadata__ entries", path)
            seen_metadata = True
            metadata = _metadata(entry, path)
        else:
            entries[name] = _entry(entry, path, name)  # a repeated name: the last wins, as in the reference
    return entries, metadata or {}


def _check_depth_and_strings(tree: object, path: Any) -> None:
    """Nesting below serde's limit and no lone surrogate in any string (iteratively: no recursion)."""
    stack = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            _no_surrogates(node, path)
        elif isinstance(node, list):  # arrays and objects (_Pairs is a list of pairs)
            if depth > MAX_DEPTH:
                raise CorruptCheckpoint(f"header nests deeper than {MAX_DEPTH} levels", path)
            if isinstance(node, _Pairs):
                for key, value in node:
                    _no_surrogates(key, path)
                    stack.append((value, depth + 1))
            else:
                stack.extend((item, depth + 1) for item in node)


def _no_surrogates(text: str, path: Any) -> None:
    if any("\ud800" <= ch <= "\udfff" for ch in text):
        raise CorruptCheckpoint("header has a lone UTF-16 surrogate escape", path)


def _metadata(entry: object, path: Any) -> dict[str, str] | None:
    if entry is None:
        return None
    if not isinstance(entry, _Pairs):
        raise CorruptCheckpoint("__metadata__ is not an object of strings", path)
    out = {}
    for key, value in entry:
        if not isinstance(value, str):
            raise CorruptCheckpoint(f"__metadata__ value of {shown(key)} is not a string", path)
        out[key] = value
    return out


def _u64(value: object) -> bool:
    return type(value) is int and 0 <= value < U64


def _entry(entry: object, path: Any, name: str) -> tuple[str, tuple[int, ...], int, int]:
    if not isinstance(entry, _Pairs):
        raise CorruptCheckpoint("header entry is not an object", path, name)
    keys = [k for k, _ in entry]
    fields = dict(entry)
    for key in ENTRY_FIELDS:
        if keys.count(key) > 1:
            raise CorruptCheckpoint(f"header entry repeats {key!r}", path, name)
        if key not in fields:
            raise CorruptCheckpoint(f"header entry lacks {key!r}", path, name)
    dtype, shape, offsets = (fields[k] for k in ENTRY_FIELDS)
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise CorruptCheckpoint(f"unknown dtype {shown(dtype)} (known: {', '.join(DTYPE_BITS)})", path, name)
    if not isinstance(shape, list) or isinstance(shape, _Pairs) or not all(_u64(d) for d in shape):
        raise CorruptCheckpoint(f"shape {shown(shape)} is not a list of non-negative integers", path, name)
    if (
        not isinstance(offsets, list)
        or isinstance(offsets, _Pairs)
        or len(offsets) != 2
        or not all(_u64(o) for o in offsets)
    ):
        raise CorruptCheckpoint(f"data_offsets {shown(offsets)} is not two non-negative integers", path, name)
    return dtype, tuple(shape), offsets[0], offsets[1]


def validate_layout(entries: dict[str, tuple[str, tuple[int, ...], int, int]], data_bytes: int, path: Any) -> None:
    """Entries tile [0, data_bytes) exactly, each sized numel × bits / 8 (the reference's rule)."""
    end = 0
    for name, (dtype, shape, begin, stop) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin != end or stop < begin:
            what = (
                "overlaps the previous tensor"
                if begin < end
                else "leaves a gap"
                if begin > end
                else "ends before it begins"
            )
            raise CorruptCheckpoint(f"data offsets [{begin}, {stop}] invalid: {what}", path, name)
        bits = math.prod(shape) * DTYPE_BITS[dtype]
        if math.prod(shape) >= U64 or bits >= U64:
            raise CorruptCheckpoint(f"shape {list(shape)} of {dtype} overflows 64-bit sizes", path, name)
        if bits % 8:
            raise CorruptCheckpoint(f"shape {list(shape)} of {dtype} does not fill whole bytes", path, name)
        if stop - begin != bits // 8:
            raise CorruptCheckpoint(
                f"data offsets [{begin}, {stop}] do not fit shape {list(shape)} of {dtype}", path, name
            )
        end = stop
    if end != data_bytes:
        raise CorruptCheckpoint(
            f"tensors cover {end} data bytes but the file has {data_bytes} "
            f"({'truncated' if end > data_bytes else 'trailing bytes'})",
            path,
        )
