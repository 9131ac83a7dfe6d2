"""Lazy dense checkpoints: list tensors from headers, fetch one tensor at a time.

One safetensors file, a sharded folder with an index, a Hugging Face folder, a legacy
`.bin`/`.pt`. `weightlab.io.open` chooses between these and PEFT adapters.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from pathlib import Path

import torch

from weightlab.errors import (
    CorruptCheckpoint,
    MissingTensor,
    NotACheckpoint,
    UnsafePickle,
)
from weightlab.io.index import read_weight_map, shard_path
from weightlab.io.safetensors_file import CODE_OF_TORCH_DTYPE, SafetensorsFile, TensorInfo
from weightlab.model_config import ModelConfig, read_model_config

LEGACY_SUFFIXES = (".bin", ".pt", ".pth")


class Checkpoint:
    """Dense weights addressed by name. Subclasses implement `_infos` and `_read`."""

    read_ahead = True  # reading ahead of use hides storage latency (models in memory have none)
    config_in_file = True  # config.json beside the weights; else `config` is all there is (memory, GGUF)

    def __init__(self, path: Path, config: ModelConfig | None = None):
        self.path = Path(path)
        self.config = config
        self.bytes_read = 0  # bytes materialised from storage, for tests and benchmarks

    @property
    def folder(self) -> Path | None:
        """The folder holding the model's other files (config.json, a tokenizer): the checkpoint's
        own, or its weight file's; None for a model held in memory."""
        return self.path if self.path.is_dir() else self.path.parent

    def formed_whole(self, name: str) -> bool:
        """Whether reading rows of `name` forms the whole tensor first (an adapter's update of it)."""
        return False

    @property
    def _infos(self) -> dict[str, TensorInfo]:
        raise NotImplementedError

    def _read(self, info: TensorInfo) -> torch.Tensor:
        raise NotImplementedError

    def names(self) -> list[str]:
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise MissingTensor("no such tensor", self.path, name) from None

    def get(
        self, name: str, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """One tensor; floating tensors are cast to `dtype` (e.g. bf16/fp8 upcast for maths)."""
        info = self.info(name)
        tensor = self._read(info)
        self.bytes_read += info.nbytes
        if device is not None:
            tensor = tensor.to(device)
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        return tensor

    def get_rows(
        self,
        name: str,
        start: int,
        stop: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        into: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Rows [start, stop) of a tensor's first dimension, read without the rest where the format
        allows (safetensors); floating rows cast to `dtype`. `into`: a uint8 buffer of at least
        the rows' bytes, which a file is read into (the rows are then a view of it)."""
        info = self.info(name)
        rows = self._read_rows(info, start, stop, into)
        self.bytes_read += rows.numel() * rows.element_size()
        if device is not None:
            rows = rows.to(device)
        if dtype is not None and rows.is_floating_point():
            rows = rows.to(dtype)
        return rows

    def _read_rows(self, info: TensorInfo, start: int, stop: int, into: torch.Tensor | None) -> torch.Tensor:
        return self._read(info)[start:stop].clone()

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, {len(self)} tensors)"


class CheckpointView(Checkpoint):
    """Another checkpoint (`inner`) with some tensors read differently (renamed, reordered, split
    or assembled): its path, config, folder and read policy are the inner one's. Subclasses set
    `_view_infos` and say which names they remap (`_remapped`) and how to read those
    (`_read_remapped`); every other tensor, and its rows, is read from `inner` as it is."""

    def __init__(self, inner: Checkpoint):
        super().__init__(inner.path, inner.config)
        self.inner = inner
        self.read_ahead, self.config_in_file = inner.read_ahead, inner.config_in_file
        self._view_infos: dict[str, TensorInfo] = {}

    @property
    def folder(self) -> Path | None:
        return self.inner.folder

    @property
    def _infos(self) -> dict[str, TensorInfo]:
        return self._view_infos

    def _remapped(self, name: str) -> bool:
        raise NotImplementedError

    def _read_remapped(self, info: TensorInfo) -> torch.Tensor:
        raise NotImplementedError

    def formed_whole(self, name: str) -> bool:
        return self._remapped(name) or self.inner.formed_whole(name)

    def _read(self, info: TensorInfo) -> torch.Tensor:
        return self._read_remapped(info) if self._remapped(info.name) else self.inner.get(info.name)

    def _read_rows(self, info: TensorInfo, start: int, stop: int, into: torch.Tensor | None) -> torch.Tensor:
        if self._remapped(info.name):
            return self._read_remapped(info)[start:stop].clone()
        return self.inner.get_rows(info.name, start, stop, into=into)


class SafetensorsCheckpoint(Checkpoint):
    """One or several safetensors files (shards), read lazily."""

    def __init__(
        self, path: Path, files: list[Path], weight_map: dict[str, str] | None = None, config: ModelConfig | None = None
    ):
        super().__init__(path, config)
        self.files = [SafetensorsFile(f) for f in files]
        infos: dict[str, TensorInfo] = {}
        for f in self.files:
            for name, info in f.infos.items():
                if name in infos:
                    raise CorruptCheckpoint(
                        f"tensor is in two shards ({infos[name].file.name}, {f.path.name})", path, name
                    )
                infos[name] = info
        if weight_map is not None:
            for name, shard in weight_map.items():
                if name not in infos or infos[name].file.name != shard:
                    raise CorruptCheckpoint(f"index names tensor in {shard}, which does not hold it", path, name)
        self.__infos = dict(sorted(infos.items())) if len(self.files) > 1 else infos
        self._by_file = {f.path: f for f in self.files}

    @property
    def _infos(self) -> dict[str, TensorInfo]:
        return self.__infos

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self.files[0].metadata) if self.files else {}

    def _read(self, info: TensorInfo) -> torch.Tensor:
        return self._by_file[info.file].read(info)

    def _read_rows(self, info: TensorInfo, start: int, stop: int, into: torch.Tensor | None) -> torch.Tensor:
        return self._by_file[info.file].read(info, rows=(start, stop), into=into)


class TorchCheckpoint(Checkpoint):
    """Legacy `pytorch_model.bin`/`.pt`, opened only with `torch.load(weights_only=True)`."""

    def __init__(self, path: Path, files: list[Path], config: ModelConfig | None = None):
        super().__init__(path, config)
        self._tensors: dict[str, torch.Tensor] = {}
        self.__infos: dict[str, TensorInfo] = {}
        for file in files:
            for name, tensor in _safe_torch_load(file).items():
                self._tensors[name] = tensor
                code = _code_of(tensor.dtype)
                self.__infos[name] = TensorInfo(
                    name, tuple(tensor.shape), code, file, -1, tensor.numel() * tensor.element_size()
                )

    @property
    def _infos(self) -> dict[str, TensorInfo]:
        return self.__infos

    def _read(self, info: TensorInfo) -> torch.Tensor:
        return self._tensors[info.name].clone()  # memory-mapped storage: only this tensor is paged in


def _code_of(dtype: torch.dtype) -> str:
    return CODE_OF_TORCH_DTYPE.get(dtype, str(dtype).removeprefix("torch."))


ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since 1.6
PICKLE_PROTO = b"\x80"  # legacy torch.save: a pickle starting with the PROTO opcode


def _safe_torch_load(file: Path) -> dict[str, torch.Tensor]:
    with open(file, "rb") as f:
        magic = f.read(4)
    if not (magic.startswith(ZIP_MAGIC) or magic.startswith(PICKLE_PROTO)):
        raise NotACheckpoint("not a torch file (neither a zip archive nor a pickle)", file)
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True, mmap=magic.startswith(ZIP_MAGIC))
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unpickling failed"
        raise UnsafePickle(f"refused: the pickle holds more than plain tensors ({first[:160]})", file) from None
    except Exception as e:  # the unpickler parses untrusted bytes: any failure means a damaged file
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise CorruptCheckpoint(f"not a readable torch file ({detail})", file) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise NotACheckpoint("the pickle is not a flat dict of tensors", file)
    return obj


def open_dense(path: Path) -> Checkpoint:
    """The dense checkpoint at `path` (a file or a folder that exists; headers only)."""
    if path.is_file():
        config = read_model_config(path.parent)
        if path.name.endswith(".index.json"):
            return _open_index(path.parent, path, config)
        if path.suffix == ".safetensors":
            return SafetensorsCheckpoint(path, [path], config=config)
        if path.suffix in LEGACY_SUFFIXES:
            return TorchCheckpoint(path, [path], config=config)
        raise NotACheckpoint("not a .safetensors, .bin/.pt file or a checkpoint folder", path)
    folder = path
    config = read_model_config(folder)
    indexes = sorted(folder.glob("*.safetensors.index.json")) or sorted(folder.glob("*.bin.index.json"))
    if len(indexes) > 1:
        raise NotACheckpoint(f"several index files ({', '.join(i.name for i in indexes)}); open one directly", folder)
    if indexes:
        return _open_index(folder, indexes[0], config)
    files = sorted(folder.glob("*.safetensors"))
    if len(files) == 1:
        return SafetensorsCheckpoint(folder, files, config=config)
    if len(files) > 1:
        raise NotACheckpoint(f"{len(files)} .safetensors files but no *.safetensors.index.json", folder)
    legacy = [folder / n for n in ("pytorch_model.bin", "model.pt", "model.pth") if (folder / n).is_file()]
    if legacy:
        return TorchCheckpoint(folder, legacy[:1], config=config)
    raise NotACheckpoint(
        "no weights found (expected *.safetensors, an index, pytorch_model.bin, a .gguf or adapter_config.json)", folder
    )


def _open_index(folder: Path, index: Path, config: ModelConfig | None) -> Checkpoint:
    weight_map = read_weight_map(index)
    shards: dict[str, Path] = {}
    for name, shard in weight_map.items():
        if shard not in shards:
            shards[shard] = shard_path(folder, shard, index, name)
    files = list(shards.values())
    if index.name.endswith(".bin.index.json"):
        return TorchCheckpoint(folder, files, config=config)
    return SafetensorsCheckpoint(folder, files, weight_map=weight_map, config=config)
