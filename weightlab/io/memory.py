"""Models in memory read as checkpoints: a `torch.nn.Module`, a PEFT model, or a mapping of names
to tensors or arrays. Nothing is copied up front: a tensor is copied when it is read, one at a
time, so an analysis holds one tensor's worth of copies, as it does reading a file.

Names are those the model's saved checkpoint has, so an in-memory model and its saved folder
match: a module's `state_dict()` names, without a `torch.compile` (`_orig_mod.`) or DDP
(`module.`) prefix, with PEFT's injected layers read as the base they wrap (`base_layer`,
`original_module`), and each tied tensor once, under its first name (what `save_pretrained`
keeps). A PEFT model is read as its adapter, as its saved folder would be.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch

from weightlab.errors import InvalidArgument, NotACheckpoint, ShapeMismatch, UnsupportedDtype, shown
from weightlab.io.checkpoint import Checkpoint
from weightlab.io.finite import require_finite
from weightlab.io.safetensors_file import TensorInfo
from weightlab.io.sources import Named, is_peft_model, label_of
from weightlab.io.tensor_store import TensorStore
from weightlab.model_config import ModelConfig, model_config_from_dict

Device = torch.device | str | None

_PEFT_PARTS = re.compile(r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector|modules_to_save)\.")
_WRAPPED = (".base_layer.", ".original_module.")  # PEFT keeps the base module's own tensors under these
_RUNTIME_PREFIXES = ("_orig_mod.", "module.")  # torch.compile and DistributedDataParallel


# The order in which safetensors writes a file's tensors: by dtype, in this order, then by name.
# An in-memory model lists its tensors so, as its saved `model.safetensors` would: same results, same order.
SAVED_DTYPE_ORDER = (
    "U64", "I64", "F64", "C64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16",
    "F8_E5M2FNUZ", "F8_E4M3FNUZ", "F8_E8M0", "F8_E4M3", "F8_E5M2", "I8", "U8", "BOOL",
)  # fmt: skip


class MemoryCheckpoint(Checkpoint):
    """Dense weights held in memory, read one tensor at a time (`TensorStore`). `tied` names each
    tensor left out because it shares its storage with one listed (name -> the name kept)."""

    read_ahead = False  # no storage to wait for: a copy is made when a tensor is used
    config_in_file = False
    folder = None  # no files beside it: its config is the module's own (`config`)

    def __init__(
        self,
        label: str,
        tensors: Mapping[str, torch.Tensor],
        config: ModelConfig | None = None,
        tied: dict[str, str] | None = None,
    ):
        super().__init__(Path(label), config)
        self.store = TensorStore(label, tensors)
        self.tied = dict(tied or {})
        rank = {code: i for i, code in enumerate(SAVED_DTYPE_ORDER)}
        self._ordered = dict(
            sorted(self.store.infos.items(), key=lambda item: (rank.get(item[1].dtype, len(rank)), item[0]))
        )

    @property
    def _infos(self) -> dict[str, TensorInfo]:
        return self._ordered

    def _read(self, info: TensorInfo) -> torch.Tensor:
        return self.store.read(info)

    def _read_rows(self, info: TensorInfo, start: int, stop: int, into: torch.Tensor | None) -> torch.Tensor:
        return self.store.read(info, rows=(start, stop))

    def get(self, name: str, device: Device = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor, copied once: straight to `device` and `dtype` (no CPU copy first)."""
        info = self.info(name)
        tensor = self.store.tensors[name].detach()
        self.bytes_read += info.nbytes
        cast = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        return tensor.to(device or "cpu", cast, copy=True).contiguous()


def _as_tensor(value: object, label: str, name: str) -> torch.Tensor:
    """A tensor of a mapping in memory, refused by name unless it is real-valued (complex weights
    would otherwise pass for buffers) and of a dtype torch holds."""
    if isinstance(value, np.ndarray):
        if value.dtype == object or value.dtype.kind not in "biuf":
            raise UnsupportedDtype(f"array of dtype {value.dtype} is not supported", label, name)
        try:
            value = torch.from_numpy(
                value if value.strides and min(value.strides) >= 0 else np.ascontiguousarray(value)
            )
        except TypeError:  # longdouble, and the other dtypes torch has no counterpart of
            raise UnsupportedDtype(f"array of dtype {value.dtype} has no torch dtype", label, name) from None
    if not isinstance(value, torch.Tensor):
        raise InvalidArgument(f"is a {type(value).__name__}, not a tensor or an array", label, name)
    _require_real(value, label, name)
    return value


def _require_real(tensor: torch.Tensor, label: str, name: str) -> None:
    if tensor.is_complex():
        raise UnsupportedDtype(f"is complex ({tensor.dtype}): weights are real-valued", label, name)


def _saved_name(key: str) -> str | None:
    """A module's state-dict key as its saved checkpoint names it; None for PEFT's own parts."""
    if _PEFT_PARTS.search(key):
        return None
    for prefix in _RUNTIME_PREFIXES:
        key = key.removeprefix(prefix)
    for wrapped in _WRAPPED:
        key = key.replace(wrapped, ".")
    return key


def _storage_key(tensor: torch.Tensor) -> tuple[Any, ...] | None:
    """What two tied tensors share (None for tensors that cannot be tied: empty, sparse, meta)."""
    if not tensor.numel() or tensor.layout != torch.strided or tensor.is_meta:
        return None
    return (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape, tensor.stride())


def _saved_names(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A module's state dict under the names its saved checkpoint has, each tied tensor once."""
    out: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    for key, tensor in state.items():
        name = _saved_name(key)
        if name is None:
            continue
        storage = _storage_key(tensor)  # others: refused when listed
        if storage is not None and storage in seen:
            tied[name] = seen[storage]
            continue
        if storage is not None:
            seen[storage] = name
        out[name] = tensor
    return out, tied


def load_into(module: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy `state` (tensors under the names a saved checkpoint has) into `module`'s tensors, all or
    nothing: every name (tied aliases, runtime prefixes, a PEFT model's base layers as `_saved_names`
    reads them; its LoRA factors stay), shape and dtype is checked first, and the casts are made, before any tensor is
    written; a refused call leaves the module bit-identical. Tied tensors are written once: a
    state that holds both names of a tie must give them equal values."""
    where = "into="
    inner = module.get_base_model() if is_peft_model(module) else module  # type: ignore[operator]
    own, tied = _saved_names(inner.state_dict(keep_vars=True))
    if any(t.is_meta for t in own.values()):
        raise InvalidArgument("the module's tensors are on the meta device: it holds no memory to load into", where)
    names = {**{n: n for n in own}, **tied}  # every name the module answers to -> the tensor it writes
    extra = sorted(n for n in state if n not in names)
    if extra:
        raise InvalidArgument(f"the merged model has {len(extra)} tensors the module lacks", where, extra[0])
    for alias, kept in tied.items():
        if alias in state and kept in state and not torch.equal(state[alias], state[kept]):
            raise InvalidArgument(
                f"the module ties it to {kept!r}, but the merged model gives them different values", where, alias
            )
    given = {kept: state[n] for n, kept in names.items() if n in state}
    missing = sorted(n for n in own if n not in given)
    if missing:
        raise InvalidArgument(f"the module has {len(missing)} tensors the merged model lacks", where, missing[0])
    prepared: dict[str, torch.Tensor] = {}
    for name, target in own.items():
        tensor = given[name]
        if tuple(tensor.shape) != tuple(target.shape):
            raise ShapeMismatch(
                f"the merged model's is {list(tensor.shape)} but the module's is {list(target.shape)}", where, name
            )
        if tensor.dtype != target.dtype and not (tensor.is_floating_point() and target.is_floating_point()):
            raise UnsupportedDtype(
                f"the merged model's is {tensor.dtype} but the module's is {target.dtype}", where, name
            )
        prepared[name] = tensor.to(dtype=target.dtype)  # any allocation happens here, before the module changes
    with torch.no_grad():
        for name, target in own.items():
            target.copy_(prepared[name])


def _module_config(module: torch.nn.Module) -> ModelConfig | None:
    config = getattr(module, "config", None)
    to_dict = getattr(config, "to_dict", None)
    return model_config_from_dict(to_dict()) if callable(to_dict) else None


def open_in_memory(source: object) -> Any:
    """A `MemoryCheckpoint` for a module or a mapping of names to tensors/arrays, or a
    `LoraAdapter` for a PEFT model (its active adapter's factors, as its saved folder holds them)."""
    label = label_of(source)
    if isinstance(source, Named):
        source = source.model
    if is_peft_model(source):
        return _peft_adapter(source, label)
    if isinstance(source, torch.nn.Module):
        tensors, tied = _saved_names(source.state_dict())
        if not tensors:
            raise NotACheckpoint("the module holds no tensors", label)
        for name, tensor in tensors.items():
            _require_real(tensor, label, name)
        return MemoryCheckpoint(label, tensors, _module_config(source), tied)
    if isinstance(source, Mapping):
        if not source:
            raise NotACheckpoint("the mapping holds no tensors", label)
        bad = next((k for k in source if not isinstance(k, str)), None)
        if bad is not None:
            raise InvalidArgument(f"key {shown(bad)} is not a tensor name (a string)", label)
        tensors, tied = _saved_names({k: _as_tensor(v, label, k) for k, v in source.items()})
        return MemoryCheckpoint(label, tensors, None, tied)
    raise InvalidArgument(
        "a model is a path, a Hub ID, a torch.nn.Module or a mapping of names to tensors; "
        f"got a {type(source).__name__}"
    )


def _peft_adapter(model: Any, label: str) -> Any:
    from peft import get_peft_model_state_dict

    from weightlab.io.adapter import LoraAdapter  # it imports torch-free pieces of this floor only

    name = model.active_adapter if isinstance(model.active_adapter, str) else model.active_adapter[0]
    config = {  # as PEFT writes adapter_config.json: enums by value, sets as lists
        k: v.value if isinstance(v, Enum) else sorted(v) if isinstance(v, set) else v
        for k, v in model.peft_config[name].to_dict().items()
    }
    tensors = get_peft_model_state_dict(model, adapter_name=name, save_embedding_layers=False)
    return LoraAdapter.in_memory(label, config, tensors)


class StateDict(dict[str, torch.Tensor]):
    """A model made in memory (name -> tensor, on the CPU, in the base's layout), with the
    record of how it was made (`report`): what `torch.nn.Module.load_state_dict` takes."""

    report: Any = None
    files: dict[str, str]

    def __repr__(self) -> str:
        size = sum(t.numel() * t.element_size() for t in self.values())
        made = f"; .report: {type(self.report).__name__}" if self.report is not None else ""
        return f"StateDict({len(self)} tensors, {size / 2**20:.1f} MiB{made})"


class StateDictWriter:
    """`CheckpointWriter`'s interface into memory: tensors (whole or by rows, as planned) land in
    a `StateDict`, side files in its `files`; non-finite tensors are refused as on disk."""

    def __init__(self, label: str = "in memory"):
        self.label = label
        self.plan: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None
        self.state = StateDict()
        self.state.files = {}
        self._rows: dict[str, int] = {}

    def planned(self, plan: list[tuple[str, tuple[int, ...], torch.dtype]]) -> StateDictWriter:
        """Every tensor's (name, shape, dtype), known before any is made (as `CheckpointWriter`'s plan)."""
        self.plan = {name: (tuple(shape), dtype) for name, shape, dtype in plan}
        return self

    def __enter__(self) -> StateDictWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None and self.plan is not None:
            missing = [n for n in self.plan if n not in self.state or n in self._rows]
            if missing:
                raise InvalidArgument(f"{len(missing)} planned tensors were never written", self.label, missing[0])

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.state:
            raise InvalidArgument("tensor written twice", self.label, name)
        require_finite(tensor, self.label, name)
        dtype = self.plan[name][1] if self.plan is not None and name in self.plan else tensor.dtype
        self.state[name] = tensor.detach().to("cpu", dtype).contiguous()

    def add_rows(self, name: str, start: int, rows: torch.Tensor) -> None:
        assert self.plan is not None and name in self.plan, name
        require_finite(rows, self.label, name)
        shape, dtype = self.plan[name]
        if name not in self.state:
            self.state[name] = torch.empty(shape, dtype=dtype)
            self._rows[name] = shape[0]
        self.state[name][start : start + rows.shape[0]] = rows.to("cpu", dtype)
        self._rows[name] -= rows.shape[0]
        if self._rows[name] == 0:
            del self._rows[name]

    def sink(self, names: list[str], elsewhere: bool) -> Any:
        if elsewhere:
            raise InvalidArgument("--ray writes into files on every node; a model made in memory cannot be: give out=")
        return self.add

    def written_elsewhere(self, names: list[str]) -> None:
        pass

    def add_file(self, name: str, text: str) -> None:
        self.state.files[name] = text


def donor_of(ckpt: Checkpoint) -> Path | None:
    """The folder an output copies config and tokenizer files from: the model's own; none in memory
    or for a GGUF file, whose config is its metadata (`config_files`)."""
    return ckpt.path if ckpt.config_in_file else None


def config_files(ckpt: Checkpoint) -> dict[str, str]:
    """What a checkpoint made from a model in memory or a GGUF file writes beside its weights: the
    module's or the metadata's `config.json` (transformers needs it to load the folder); nothing
    for a model on disk (its donor folder is copied)."""
    if not ckpt.config_in_file and ckpt.config is not None and ckpt.config.raw:
        return {"config.json": config_text(ckpt.config.raw)}
    return {}


def config_text(raw: Mapping[str, Any]) -> str:
    """A config.json as weightlab writes one: sorted keys, indented, a final newline (the same bytes each time)."""
    return json.dumps(raw, indent=2, sort_keys=True) + "\n"
