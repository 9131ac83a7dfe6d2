"""Differential fuzzing: on mutated files (byte flips, header field edits, truncations, appended
bytes), our header verdict equals the safetensors library's, and we only ever raise our own error."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from weightlab.errors import WeightlabError
from weightlab.io.safetensors_file import SafetensorsFile, write_safetensors

pytestmark = pytest.mark.slow  # the fast lane, pytest -m "not slow", leaves these out

SEEDS = range(3000)
ODD_VALUES = [
    -1,
    -0.0,
    0,
    1,
    2.0,
    2**64,
    2**64 - 1,
    2**63,
    True,
    None,
    "F32",
    "Q17",
    [],
    [2, 3],
    {"a": 1},
    "x" * 3,
    1e400,
    [1.5],
    [-2],
    [[1]],
]


def seed_files(root: Path) -> list[bytes]:
    """Valid files from the reference writer and ours: metadata, several dtypes, zero-size and scalar tensors."""
    gen = torch.Generator().manual_seed(0)
    save_file(
        {
            "w": torch.randn(3, 4, generator=gen),
            "b": torch.zeros(4, dtype=torch.bfloat16),
            "i": torch.arange(5, dtype=torch.int64),
        },
        root / "ref.safetensors",
        metadata={"format": "pt"},
    )
    write_safetensors(
        root / "ours.safetensors",
        {"e": torch.zeros(0, 3), "s": torch.tensor(1.5), "h": torch.ones(2, 2, dtype=torch.float16)},
        {"k": "v"},
    )
    return [(root / name).read_bytes() for name in ("ref.safetensors", "ours.safetensors")]


def split(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def join(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def mutate(raw: bytes, rng: random.Random) -> bytes:
    kind = rng.randrange(6)
    if kind == 0:  # flip bytes anywhere in the length prefix or header
        (n,) = struct.unpack("<Q", raw[:8])
        out = bytearray(raw)
        for _ in range(rng.randint(1, 3)):
            out[rng.randrange(min(len(out), 8 + n))] = rng.randrange(256)
        return bytes(out)
    if kind == 1:  # truncate
        return raw[: rng.randrange(len(raw))]
    if kind == 2:  # append bytes
        return raw + bytes(rng.randrange(256) for _ in range(rng.randint(1, 9)))
    header, data = split(raw)
    names = [n for n in header if n != "__metadata__"]
    if kind == 3:  # edit one field of one entry
        entry = header[rng.choice(names)]
        field = rng.choice(["dtype", "shape", "data_offsets"])
        if rng.random() < 0.2:
            del entry[field]
        elif field == "data_offsets" and rng.random() < 0.5:
            entry[field] = [o + rng.choice([-4, -1, 1, 4]) for o in entry[field]]
        else:
            entry[field] = rng.choice([*ODD_VALUES, "F16", "BF16", "I64", "U8", "F8_E4M3", "F4", "C64"])
        return join(header, data)
    if kind == 4:  # metadata of another type, or a repeated key, written as raw JSON text
        choice = rng.randrange(4)
        if choice == 0:
            header["__metadata__"] = rng.choice(ODD_VALUES)
        elif choice == 1:
            name = rng.choice(names)
            text = json.dumps(header)
            dup = json.dumps(header[name])
            raw_text = text[:-1] + f', "{name}": {dup}' + "}"
            return struct.pack("<Q", len(raw_text)) + raw_text.encode() + data
        elif choice == 2:
            entry = header[rng.choice(names)]
            text = json.dumps(header).replace(json.dumps(entry), json.dumps(entry)[:-1] + ', "dtype": "F32"}', 1)
            return struct.pack("<Q", len(text)) + text.encode() + data
        else:
            header[rng.choice(names)]["extra"] = rng.choice(ODD_VALUES)
        return join(header, data)
    # swap the offsets of two entries, or drop an entry (leaving its bytes uncovered)
    a, b = rng.sample(names, 2)
    if rng.random() < 0.5:
        header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], header[a]["data_offsets"]
    else:
        del header[a]
    return join(header, data)


def reference_verdict(path: Path):
    try:
        with safe_open(path, "pt") as f:
            listing = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
            return listing, f.metadata() or {}
    except Exception:
        return None


def our_verdict(path: Path):
    try:
        f = SafetensorsFile(path)
    except WeightlabError:
        return None
    return {n: (i.shape, i.dtype) for n, i in f.infos.items()}, f.metadata


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> list[bytes]:
    return seed_files(tmp_path_factory.mktemp("fuzz"))


def test_mutated_files_get_the_reference_verdict(seeds, tmp_path):
    rng = random.Random(1234)
    disagreements, accepted, refused = [], 0, 0
    for i in SEEDS:
        raw = mutate(rng.choice(seeds), rng)
        path = tmp_path / f"m{i % 8}.safetensors"
        path.write_bytes(raw)
        ref, ours = reference_verdict(path), our_verdict(path)  # ours raises nothing but WeightlabError
        if (ref is None) != (ours is None):
            disagreements.append((i, "accepts" if ours else "refuses", raw[:200]))
        elif ref is not None:
            ref_listing = {k: (shape, dtype.upper()) for k, (shape, dtype) in ref[0].items()}
            our_listing = {k: (shape, dtype) for k, (shape, dtype) in ours[0].items()}
            assert {k: v[0] for k, v in ref_listing.items()} == {k: v[0] for k, v in our_listing.items()}, i
            assert ref[1] == ours[1], i
            accepted += 1
        else:
            refused += 1
    assert not disagreements, disagreements[:5]
    assert accepted > 150 and refused > 1500  # the mutations explore both sides of the boundary


def test_the_seed_files_are_valid_for_both(seeds, tmp_path):
    for i, raw in enumerate(seeds):
        (tmp_path / f"s{i}.safetensors").write_bytes(raw)
        assert reference_verdict(tmp_path / f"s{i}.safetensors") is not None
        assert our_verdict(tmp_path / f"s{i}.safetensors") is not None
