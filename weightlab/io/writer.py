"""Write checkpoints the ecosystem loads: sharded safetensors with an index, donor files copied."""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import torch

from weightlab.errors import CheckpointNotFound, InvalidArgument
from weightlab.io.atomic import atomic_path, require_free_space
from weightlab.io.finite import require_finite
from weightlab.io.safetensors_file import safetensors_header, tensor_bytes, torch_dtype, write_safetensors

if TYPE_CHECKING:
    from weightlab.io.checkpoint import Checkpoint

TensorSpec = tuple[str, tuple[int, ...], torch.dtype]

DEFAULT_SHARD_SIZE = 5 * 1000**3
MAX_SHARD_SIZE = 1000**5
# Files a model folder needs beside its weights (config, tokenizer, generation settings).
DONOR_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
    "preprocessor_config.json",
)
_UNITS = {"KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}


def parse_size(text: str | int) -> int:
    """'5GB', '500MiB', '1000000' -> bytes (1 B to 1 PB)."""
    if isinstance(text, int) and not isinstance(text, bool):
        text = str(text)
    if not isinstance(text, str):
        raise InvalidArgument(f"--shard-size {text!r}: give a size such as 5GB")
    s = text.strip().upper().replace(" ", "")
    for unit, factor in sorted(_UNITS.items(), key=lambda kv: -len(kv[0])):
        if s.endswith(unit):
            s, mult = s[: -len(unit)], factor
            break
    else:
        s, mult = s.removesuffix("B"), 1
    try:
        value = float(s) * mult
    except ValueError:
        raise InvalidArgument(f"--shard-size {text!r}: cannot read a size (try 5GB or 500MB)") from None
    if not 1 <= value <= MAX_SHARD_SIZE:
        raise InvalidArgument(f"--shard-size {text!r}: give a size from 1 byte to 1PB")
    return int(value)


def stored_plan(ckpt: Checkpoint, names: list[str] | None = None) -> list[TensorSpec]:
    """(name, shape, stored dtype) of `names` (default: every tensor) of a checkpoint, from its
    headers: the `plan` of a writer that receives tensors in any order."""
    return [
        (n, tuple(ckpt.info(n).shape), torch_dtype(ckpt.info(n).dtype, ckpt.path, n))
        for n in (ckpt.names() if names is None else names)
    ]


@dataclass(frozen=True)
class Placement:
    """A planned tensor's place in a staged shard file."""

    path: str
    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    out_dir: str  # named in errors

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the tensor there (finite, of the planned shape and dtype); from any process that sees the path."""
        data = _planned_bytes(tensor, (self.shape, self.dtype), self.out_dir, name)
        fd = os.open(self.path, os.O_WRONLY)
        try:
            _pwrite_all(fd, data, self.offset)
        finally:
            os.close(fd)


class PlacedSink:
    """Writes planned tensors into their places from any process (a Ray worker): picklable."""

    def __init__(self, placements: dict[str, Placement]):
        self.placements = placements

    def __call__(self, name: str, tensor: torch.Tensor) -> None:
        self.placements[name].write(name, tensor)


def _planned_bytes(
    tensor: torch.Tensor, planned: tuple[tuple[int, ...], torch.dtype], out_dir: str | Path, name: str
) -> memoryview:
    if (tuple(tensor.shape), tensor.dtype) != planned:
        raise InvalidArgument(f"planned as {planned}, got {(tuple(tensor.shape), tensor.dtype)}", out_dir, name)
    return tensor_bytes(tensor, out_dir, name)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


class CheckpointWriter:
    """Stream tensors into `out_dir` as shards of at most `shard_size` bytes.

    Use as a context manager: everything lands in a temporary folder beside `out_dir`, and only
    a clean exit renames it into place. Without a plan, tensors are buffered up to one shard.
    With `plan` — every tensor's (name, shape, dtype), known before any is computed — the shard
    files and headers are laid out first and each tensor is written to its place as it comes:
    memory holds no shard buffer at all.
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        shard_size: int | str = DEFAULT_SHARD_SIZE,
        prefix: str = "model",
        metadata: dict[str, str] | None = None,
        donor: str | Path | None = None,
        force: bool = False,
        plan: list[TensorSpec] | None = None,
        files: Mapping[str, str] | None = None,
    ):
        self.out_dir = Path(out_dir)
        self.files = dict(files or {})  # side files written with the weights (a module's config.json)
        self.shard_size = parse_size(shard_size)
        self.prefix = prefix
        self.metadata = {"format": "pt", **(metadata or {})}
        self.donor = Path(donor) if donor else None
        if self.donor is not None and not self.donor.exists():
            raise CheckpointNotFound("--donor: no such file or folder", self.donor)
        self.force = force
        self._stack = ExitStack()
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffered = 0
        self._shards: list[list[str]] = []
        self.total_size = 0
        self.plan = {name: (tuple(shape), dtype) for name, shape, dtype in plan} if plan is not None else None
        self._placed: dict[str, tuple[int, int]] = {}  # planned name -> (shard file descriptor, offset)
        self._written: set[str] = set()
        self._rows: dict[str, int] = {}  # rows written so far of tensors written in parts
        self._files: dict[str, Path] = {}  # planned name -> its shard file (in the staging folder)

    @property
    def _planned(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """The plan, for the code paths that only run with one."""
        assert self.plan is not None
        return self.plan

    def __enter__(self) -> CheckpointWriter:
        self._tmp = self._stack.enter_context(atomic_path(self.out_dir, self.force, directory=True))
        if self.plan is not None:
            self._lay_out()
        return self

    def _lay_out(self) -> None:
        """Assign planned tensors to shards in plan order, write headers, size the files."""
        current: list[TensorSpec] = []
        size = 0
        groups = []
        for name, (shape, dtype) in self._planned.items():
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if current and size + nbytes > self.shard_size:
                groups.append(current)
                current, size = [], 0
            current.append((name, shape, dtype))
            size += nbytes
            self.total_size += nbytes
        groups.append(current)
        require_free_space(self._tmp, self.total_size, f"the output {self.out_dir}")  # before a byte is written
        for index, specs in enumerate(groups):
            header, offsets = safetensors_header(specs, self.metadata, self.out_dir)
            path = self._tmp / f"shard-{index}.tmp"
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._stack.callback(os.close, fd)
            os.pwrite(fd, header, 0)
            end = max(
                (offsets[n] + math.prod(s) * torch.empty((), dtype=d).element_size() for n, s, d in specs),
                default=len(header),
            )
            os.ftruncate(fd, end)
            self._placed.update({name: (fd, offsets[name]) for name, _, _ in specs})
            self._files.update({name: path for name, _, _ in specs})
            self._shards.append([name for name, _, _ in specs])

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if (
            name in self._buffer
            or name in self._written
            or (self.plan is None and any(name in s for s in self._shards))
        ):
            raise InvalidArgument("tensor written twice", self.out_dir, name)
        if self.plan is not None:
            self._write_planned(name, tensor)
            return
        require_finite(tensor, self.out_dir, name)
        size = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffered + size > self.shard_size:
            self._flush()
        self._buffer[name] = tensor.detach().to("cpu").contiguous()
        self._buffered += size
        self.total_size += size

    def _write_planned(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self._planned:
            raise InvalidArgument("tensor not in the output plan", self.out_dir, name)
        fd, offset = self._placed[name]
        _pwrite_all(fd, _planned_bytes(tensor, self._planned[name], self.out_dir, name), offset)
        self._written.add(name)

    def sink(self, names: list[str], elsewhere: bool) -> Callable[[str, torch.Tensor], None]:
        """What writes the planned tensors `names`: `add` here, or, `elsewhere` (Ray workers), a
        picklable writer into their places in the staging folder; then call `written_elsewhere`."""
        if not elsewhere:
            return self.add
        return PlacedSink(
            {
                name: Placement(str(self._files[name]), self._placed[name][1], *self._planned[name], str(self.out_dir))
                for name in names
            }
        )

    def written_elsewhere(self, names: list[str]) -> None:
        """Count tensors another process wrote through `sink(..., elsewhere=True)` as written."""
        self._written.update(names)

    def add_rows(self, name: str, start: int, rows: torch.Tensor) -> None:
        """Write rows [start, start + len(rows)) of a planned tensor; it counts as written once
        every row is (a tensor too large to hold whole is written in parts)."""
        if self.plan is None or name not in self.plan:
            raise InvalidArgument("rows of a tensor not in the output plan", self.out_dir, name)
        shape, dtype = self.plan[name]
        if (
            name in self._written
            or tuple(rows.shape[1:]) != shape[1:]
            or rows.dtype != dtype
            or not 0 <= start <= start + rows.shape[0] <= shape[0]
        ):
            raise InvalidArgument(
                f"rows {start}+{tuple(rows.shape)} do not fit the planned {shape}", self.out_dir, name
            )
        fd, offset = self._placed[name]
        row_bytes = math.prod(shape[1:]) * rows.element_size()
        _pwrite_all(fd, tensor_bytes(rows, self.out_dir, name), offset + start * row_bytes)
        self._rows[name] = self._rows.get(name, 0) + rows.shape[0]
        if self._rows[name] == shape[0]:
            self._written.add(name)

    def _flush(self) -> None:
        index = len(self._shards)
        write_safetensors(self._tmp / f"shard-{index}.tmp", self._buffer, self.metadata)
        self._shards.append(list(self._buffer))
        self._buffer, self._buffered = {}, 0

    def add_file(self, name: str, text: str) -> None:
        """A side file (e.g. a JSON record of how the checkpoint was made)."""
        (self._tmp / name).write_text(text)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        if exc_type is not None:  # the caller failed: the temporary folder is removed
            return bool(self._stack.__exit__(exc_type, exc, tb))
        with self._stack:  # renamed into place only if finishing succeeds too
            self._finish()
        return False

    def _finish(self) -> None:
        if self.plan is not None:
            missing = [n for n in self.plan if n not in self._written]
            if missing:
                raise InvalidArgument(f"{len(missing)} planned tensors were never written", self.out_dir, missing[0])
        elif self._buffer or not self._shards:
            self._flush()
        n = len(self._shards)
        if n == 1:
            (self._tmp / "shard-0.tmp").rename(self._tmp / f"{self.prefix}.safetensors")
        else:
            weight_map = {}
            for i, names in enumerate(self._shards):
                shard = f"{self.prefix}-{i + 1:05d}-of-{n:05d}.safetensors"
                (self._tmp / f"shard-{i}.tmp").rename(self._tmp / shard)
                weight_map.update({name: shard for name in names})
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
            (self._tmp / f"{self.prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        for name, text in self.files.items():
            (self._tmp / name).write_text(text)
        if self.donor is not None:
            copy_donor_files(self.donor, self._tmp)


def copy_donor_files(donor: Path, dest: Path) -> list[str]:
    """Copy config, tokenizer and generation files from a model folder (or a file's folder). What
    weightlab writes is never quantized, so a quantized donor's config loses its quantization keys
    (transformers would otherwise look for packed weights that are not there)."""
    folder = donor if donor.is_dir() else donor.parent
    copied = []
    for name in DONOR_FILES:
        if (folder / name).is_file() and not (dest / name).exists():
            shutil.copy2(folder / name, dest / name)
            if name == "config.json":
                _unquantized_config(dest / name)
            copied.append(name)
    return copied


QUANTIZATION_KEYS = ("quantization_config", "quantization")  # transformers', MLX's


def _unquantized_config(path: Path) -> None:
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return  # copied as it was: a donor's file we do not need to understand
    if isinstance(config, dict) and any(k in config for k in QUANTIZATION_KEYS):
        kept = {k: v for k, v in config.items() if k not in QUANTIZATION_KEYS}
        path.write_text(json.dumps(kept, indent=2) + "\n")
