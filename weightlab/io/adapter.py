"""PEFT LoRA adapters: factors per target module, and the dense update only on request.

A LoRA module adds ΔW = s·B·A to its base weight (Hu et al. 2021, "LoRA", eq. 3), with
A (r×in), B (out×r) and s = lora_alpha/r, or lora_alpha/√r with rsLoRA (Kalajdzievski 2023).
`rank_pattern`/`alpha_pattern` override r and alpha per module, matched as PEFT does:
a key k applies to module m when m matches `(.*\\.)?(k)$`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from weightlab.errors import CorruptCheckpoint, InvalidArgument, NotACheckpoint, ShapeMismatch
from weightlab.io.checkpoint import Checkpoint
from weightlab.io.finite import require_finite_input
from weightlab.io.safetensors_file import SafetensorsFile, TensorInfo
from weightlab.naming import canonical_name

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.weight)?$")


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: where its factors live and how they combine."""

    module: str  # module path inside the model, e.g. "model.layers.0.self_attn.q_proj"
    a: TensorInfo  # r × in (for embeddings: r × num_embeddings)
    b: TensorInfo  # out × r (for embeddings: dim × r)
    rank: int
    alpha: float
    scale: float
    fan_in_fan_out: bool  # base weight stored in×out (GPT-2 Conv1D)
    embedding: bool

    @property
    def weight_name(self) -> str:
        return f"{self.module}.weight"


def _pattern_value(patterns: dict, module: str, default):
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_rank(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def validate_adapter_config(cfg: object, path: Path) -> dict:
    """The adapter_config.json fields weightlab reads, with PEFT's types: r a positive integer,
    lora_alpha a finite number, rank_pattern/alpha_pattern objects of such values keyed by valid
    regular expressions, flags booleans."""
    if not isinstance(cfg, dict):
        raise CorruptCheckpoint("adapter_config.json is not a JSON object", path)
    if not _is_rank(cfg.get("r", 8)):
        raise CorruptCheckpoint(f"r = {cfg.get('r')!r} is not a positive integer", path)
    if not _is_number(cfg.get("lora_alpha", 8)):
        raise CorruptCheckpoint(f"lora_alpha = {cfg.get('lora_alpha')!r} is not a finite number", path)
    for key, valid, what in (("rank_pattern", _is_rank, "positive integers"), ("alpha_pattern", _is_number, "finite numbers")):
        pattern = cfg.get(key) or {}
        if not isinstance(pattern, dict):
            raise CorruptCheckpoint(f"{key} is not an object", path)
        for module, value in pattern.items():
            if not valid(value):
                raise CorruptCheckpoint(f"{key}[{module!r}] = {value!r}: values must be {what}", path)
            try:
                re.compile(rf"(.*\.)?({module})$")
            except (re.error, RecursionError, OverflowError) as e:
                raise CorruptCheckpoint(f"{key} key {module!r} is not a valid regular expression ({e})", path) from None
    for key in ("use_rslora", "use_dora", "fan_in_fan_out"):
        if not isinstance(cfg.get(key, False), (bool, type(None))):
            raise CorruptCheckpoint(f"{key} = {cfg[key]!r} is not true or false", path)
    if not isinstance(cfg.get("peft_type", "LORA"), str):
        raise CorruptCheckpoint(f"peft_type = {cfg['peft_type']!r} is not a string", path)
    return cfg


class LoraAdapter:
    """A PEFT LoRA adapter folder (`adapter_config.json` + `adapter_model.safetensors`)."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder)
        config_path = self.path / "adapter_config.json"
        try:
            raw = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise CorruptCheckpoint("adapter_config.json is not valid JSON", config_path) from None
        self.adapter_config: dict = validate_adapter_config(raw, config_path)
        peft_type = str(self.adapter_config.get("peft_type", "LORA")).upper()
        if peft_type != "LORA":
            raise NotACheckpoint(f"peft_type {peft_type} is not LoRA; only LoRA adapters are supported", config_path)
        if self.adapter_config.get("use_dora"):
            raise InvalidArgument("DoRA adapters are not supported: their update is not s·B·A", config_path)
        weights = self.path / "adapter_model.safetensors"
        if not weights.is_file():
            if (self.path / "adapter_model.bin").is_file():
                raise NotACheckpoint("adapter_model.bin is not supported; save the adapter with safetensors", self.path)
            raise NotACheckpoint("adapter_model.safetensors is missing", self.path)
        self.file = SafetensorsFile(weights)
        self.modules = self._collect_modules()
        self.bytes_read = 0

    @property
    def base_model_name_or_path(self) -> str | None:
        return self.adapter_config.get("base_model_name_or_path")

    def _collect_modules(self) -> dict[str, LoraModule]:
        cfg = self.adapter_config
        parts: dict[str, dict[str, TensorInfo]] = {}
        for name, info in self.file.infos.items():
            found = _KEY.match(name)
            if found:
                parts.setdefault(found["module"], {})[found["kind"]] = info
        modules = {}
        for module, kinds in sorted(parts.items()):
            embedding = "lora_embedding_A" in kinds
            a = kinds.get("lora_embedding_A" if embedding else "lora_A")
            b = kinds.get("lora_embedding_B" if embedding else "lora_B")
            if a is None or b is None:
                raise CorruptCheckpoint("module has only one of its LoRA factors", self.file.path, module)
            rank = int(_pattern_value(cfg.get("rank_pattern") or {}, module, cfg.get("r", 8)))
            alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", 8)))
            _check_factor_shapes(a, b, rank, self.file.path, module)
            scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
            modules[module] = LoraModule(module, a, b, rank, alpha, scale, bool(cfg.get("fan_in_fan_out")), embedding)
        if not modules:
            raise NotACheckpoint("adapter holds no lora_A/lora_B tensors", self.file.path)
        return modules

    def factors(self, module: str, device=None, dtype: torch.dtype | None = torch.float32) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A, B, s) of one module, so ΔW = s·B·A in out×in orientation (embeddings: ΔWᵀ)."""
        m = self.modules[module]
        a, b = (self.file.read(info) for info in (m.a, m.b))
        self.bytes_read += m.a.nbytes + m.b.nbytes
        for factor, info in ((a, m.a), (b, m.b)):
            require_finite_input(factor, self.path, info.name)
        return a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype), m.scale

    def matrix_factors(self, module: str, device=None, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(L, R, s) with ΔW = s·L·R in the out×in orientation `naming.as_matrix` gives the base weight."""
        a, b, scale = self.factors(module, device, dtype)
        return (a.T, b.T, scale) if self.modules[module].embedding else (b, a, scale)

    def delta(self, module: str, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense update in the base weight's storage layout: what `merge_and_unload` adds."""
        m = self.modules[module]
        a, b, scale = self.factors(module, device, dtype)
        delta = (b @ a) * scale
        return delta.T if (m.fan_in_fan_out or m.embedding) else delta

    def __repr__(self) -> str:
        return f"LoraAdapter({str(self.path)!r}, {len(self.modules)} modules)"


def _check_factor_shapes(a: TensorInfo, b: TensorInfo, rank: int, path: Path, module: str) -> None:
    """A is r×in and B out×r, both 2-D and floating, with the r that adapter_config gives."""
    for info, role in ((a, "A"), (b, "B")):
        if len(info.shape) != 2 or not info.is_float:
            raise CorruptCheckpoint(f"LoRA factor {role} ({info.name}) is {info.dtype} {list(info.shape)}, "
                                    "not a floating-point matrix", path, module)
    wrong = [f"{role} ({info.name}) has rank {r}" for info, role, r in ((a, "A", a.shape[0]), (b, "B", b.shape[1]))
             if r != rank]
    if wrong:
        raise CorruptCheckpoint(f"{'; '.join(wrong)} but adapter_config gives r={rank}", path, module)


class AdaptedCheckpoint(Checkpoint):
    """Base weights with an adapter's updates applied on the fly: W' = W + s·B·A."""

    def __init__(self, base: Checkpoint, adapter: LoraAdapter):
        super().__init__(adapter.path, base.config)
        self.base = base
        self.adapter = adapter
        by_key = {canonical_name(n): n for n in base.names()}
        self.module_of: dict[str, str] = {}  # base weight name -> adapter module
        for module, m in adapter.modules.items():
            name = by_key.get(canonical_name(m.weight_name))
            if name is None:
                raise CorruptCheckpoint("adapter targets a module the base does not have", adapter.path, m.weight_name)
            expected = base.info(name).shape
            got = (m.a.shape[1], m.b.shape[0]) if m.embedding else (m.b.shape[0], m.a.shape[1])
            if m.fan_in_fan_out and not m.embedding:
                got = got[::-1]
            if tuple(expected) != got:
                raise ShapeMismatch(f"adapter update is {list(got)} but the base weight is {list(expected)}; "
                                    "is this adapter for another base?", adapter.path, name)
            self.module_of[name] = module

    @property
    def _infos(self) -> dict[str, TensorInfo]:
        return self.base._infos

    def apply(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The base tensor `weight` (floating, on its device) with this adapter's update added, if any."""
        module = self.module_of.get(name)
        return weight if module is None else weight + self.adapter.delta(module, weight.device, weight.dtype)

    def get(self, name: str, device=None, dtype: torch.dtype | None = None) -> torch.Tensor:
        if name not in self.module_of:
            return self.base.get(name, device, dtype)
        return self.apply(name, self.base.get(name, device, torch.float32 if dtype is None else dtype))
