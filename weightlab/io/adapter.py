"""PEFT LoRA adapters: factors per target module, and the dense update only on request.

A LoRA module adds ΔW = s·B·A to its base weight (Hu et al. 2021, "LoRA", eq. 3), with
A (r×in), B (out×r) and s = lora_alpha/r, or lora_alpha/√r with rsLoRA (Kalajdzievski 2023).
`rank_pattern`/`alpha_pattern` override r and alpha per module, matched as PEFT does:
a key k applies to module m when m matches `(.*\\.)?(k)$`.

Every tensor of the file is understood, or the adapter is refused naming it: besides the
factors, `lora_bias: true` gives B a bias b and the module's bias moves by s·b (PEFT's merge);
a module in `modules_to_save` (a trained head, a pooler) is saved whole and replaces the
base's tensors, and so does a targeted module's `base_layer` tensor (PEFT saves the embedding
that way, e.g. after a vocabulary resize; its LoRA update then adds to it). Anything else (DoRA
magnitudes, trainable-token deltas, ...) is refused.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from weightlab.errors import CorruptCheckpoint, InvalidArgument, NotACheckpoint, ShapeMismatch, shown
from weightlab.io.adapter_writer import LoraFactors
from weightlab.io.checkpoint import Checkpoint
from weightlab.io.finite import require_finite_input
from weightlab.io.safetensors_file import SafetensorsFile, TensorInfo
from weightlab.io.tensor_store import TensorStore
from weightlab.naming import canonical_name

Device = torch.device | str | None

_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.weight)?$"
)
_BIAS = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_B\.bias$")
_PREFIX = "base_model.model."
_BASE_LAYER = ".base_layer."  # PEFT's save_embedding_layers: a targeted module's own weights, saved whole


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
    bias: TensorInfo | None = None  # lora_B's bias (lora_bias=True): the module's bias moves by s·b

    @property
    def weight_name(self) -> str:
        return f"{self.module}.weight"

    @property
    def bias_name(self) -> str:
        return f"{self.module}.bias"


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_rank(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def validate_adapter_config(cfg: object, path: Path) -> dict[str, Any]:
    """The adapter_config.json fields weightlab reads, with PEFT's types: r a positive integer,
    lora_alpha a finite number, rank_pattern/alpha_pattern objects of such values keyed by valid
    regular expressions, flags booleans."""
    if not isinstance(cfg, dict):
        raise CorruptCheckpoint("adapter_config.json is not a JSON object", path)
    if not _is_rank(cfg.get("r", 8)):
        raise CorruptCheckpoint(f"r = {shown(cfg.get('r'))} is not a positive integer", path)
    if not _is_number(cfg.get("lora_alpha", 8)):
        raise CorruptCheckpoint(f"lora_alpha = {shown(cfg.get('lora_alpha'))} is not a finite number", path)
    for key, valid, what in (
        ("rank_pattern", _is_rank, "positive integers"),
        ("alpha_pattern", _is_number, "finite numbers"),
    ):
        pattern = cfg.get(key) or {}
        if not isinstance(pattern, dict):
            raise CorruptCheckpoint(f"{key} is not an object", path)
        for module, value in pattern.items():
            if not valid(value):
                raise CorruptCheckpoint(f"{key}[{shown(module)}] = {shown(value)}: values must be {what}", path)
            try:
                re.compile(rf"(.*\.)?({module})$")
            except (re.error, RecursionError, OverflowError) as e:
                raise CorruptCheckpoint(f"{key} key {module!r} is not a valid regular expression ({e})", path) from None
    saved = cfg.get("modules_to_save")
    if saved is not None and not (isinstance(saved, list) and all(isinstance(m, str) and m for m in saved)):
        raise CorruptCheckpoint(f"modules_to_save = {shown(saved)} is not a list of module names", path)
    for key in ("use_rslora", "use_dora", "fan_in_fan_out", "lora_bias"):
        if not isinstance(cfg.get(key, False), (bool, type(None))):
            raise CorruptCheckpoint(f"{key} = {shown(cfg[key])} is not true or false", path)
    if not isinstance(cfg.get("peft_type", "LORA"), str):
        raise CorruptCheckpoint(f"peft_type = {shown(cfg['peft_type'])} is not a string", path)
    return cfg


class LoraAdapter:
    """A PEFT LoRA adapter folder (`adapter_config.json` + `adapter_model.safetensors`)."""

    def __init__(self, folder: str | Path):
        path = Path(folder)
        config_path = path / "adapter_config.json"
        try:
            raw = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise CorruptCheckpoint("adapter_config.json is not valid JSON", config_path) from None
        self._load(path, raw, config_path, lambda: _weights_file(path))

    @classmethod
    def in_memory(cls, label: str, config: dict[str, Any], tensors: Mapping[str, torch.Tensor]) -> LoraAdapter:
        """An adapter held in memory (a PEFT model's config and `get_peft_model_state_dict`),
        read exactly as its saved folder would be."""
        adapter = cls.__new__(cls)
        adapter._load(Path(label), config, Path(label), lambda: TensorStore(label, tensors))
        return adapter

    def _load(
        self, path: Path, raw: object, config_path: Path, weights: Callable[[], SafetensorsFile | TensorStore]
    ) -> None:
        self.path = path
        self.adapter_config: dict[str, Any] = validate_adapter_config(raw, config_path)
        peft_type = str(self.adapter_config.get("peft_type", "LORA")).upper()
        if peft_type != "LORA":
            raise NotACheckpoint(f"peft_type {peft_type} is not LoRA; only LoRA adapters are supported", config_path)
        if self.adapter_config.get("use_dora"):
            raise InvalidArgument("DoRA adapters are not supported: their update is not s·B·A", config_path)
        self.file: SafetensorsFile | TensorStore = weights()  # a file, or tensors in memory alike
        self.modules, self.saved = self._collect()
        self.bytes_read = 0

    @property
    def base_model_name_or_path(self) -> str | None:
        return self.adapter_config.get("base_model_name_or_path")

    def _saves(self, module: str) -> bool:
        """True when `module` lies in a module of `modules_to_save`: PEFT saves the whole of a module
        whose name is the entry or ends in `.entry`, everything below it included (`pooler` saves
        `pooler.dense.weight`)."""
        parts = module.split(".")
        ancestors = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
        return any(
            a == m or a.endswith("." + m) for m in self.adapter_config.get("modules_to_save") or [] for a in ancestors
        )

    def _collect(self) -> tuple[dict[str, LoraModule], dict[str, TensorInfo]]:
        """The LoRA modules, and the tensors saved whole (model name -> info); anything else is refused."""
        cfg = self.adapter_config
        parts: dict[str, dict[str, TensorInfo]] = {}
        biases: dict[str, TensorInfo] = {}
        saved: dict[str, TensorInfo] = {}
        for name, info in self.file.infos.items():
            if found := _KEY.match(name):
                parts.setdefault(found["module"], {})[found["kind"]] = info
            elif found := _BIAS.match(name):
                if not cfg.get("lora_bias"):
                    raise CorruptCheckpoint(
                        "a LoRA bias, but adapter_config does not say lora_bias: true", self.file.path, name
                    )
                biases[found["module"]] = info
            elif "lora_" not in name and (
                self._saves(name.removeprefix(_PREFIX).rpartition(".")[0]) or _BASE_LAYER in name
            ):
                saved[name.removeprefix(_PREFIX)] = info
            else:
                raise CorruptCheckpoint(
                    "neither a LoRA factor nor a tensor of a module in modules_to_save: weightlab "
                    "cannot tell what it changes",
                    self.file.path,
                    name,
                )
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
            bias = biases.pop(module, None)
            if bias is not None and (embedding or bias.shape != (b.shape[0],) or not bias.is_float):
                raise CorruptCheckpoint(
                    f"LoRA bias is {bias.dtype} {list(bias.shape)}, not the {b.shape[0]} outputs of its B factor",
                    self.file.path,
                    bias.name,
                )
            modules[module] = LoraModule(
                module, a, b, rank, alpha, scale, bool(cfg.get("fan_in_fan_out")), embedding, bias
            )
        if biases:
            raise CorruptCheckpoint(
                "a LoRA bias of a module without LoRA factors", self.file.path, next(iter(biases.values())).name
            )
        for name, info in saved.items():
            if _BASE_LAYER in name and name.partition(_BASE_LAYER)[0] not in modules:
                raise CorruptCheckpoint(
                    "a base_layer tensor of a module without LoRA factors", self.file.path, info.name
                )
        if not modules and not saved:
            raise NotACheckpoint("adapter holds no lora_A/lora_B tensors", self.file.path)
        return modules, saved

    def factors(
        self, module: str, device: Device = None, dtype: torch.dtype | None = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A, B, s) of one module, so ΔW = s·B·A in out×in orientation (embeddings: ΔWᵀ)."""
        m = self.modules[module]
        a, b = (self.file.read(info) for info in (m.a, m.b))
        self.bytes_read += m.a.nbytes + m.b.nbytes
        for factor, info in ((a, m.a), (b, m.b)):
            require_finite_input(factor, self.path, info.name)
        return a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype), m.scale

    def matrix_factors(
        self, module: str, device: Device = None, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(L, R, s) with ΔW = s·L·R in the out×in orientation `naming.as_matrix` gives the base weight."""
        a, b, scale = self.factors(module, device, dtype)
        return (a.T, b.T, scale) if self.modules[module].embedding else (b, a, scale)

    def bias_delta(self, module: str, device: Device = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """s·b: what a module's LoRA bias adds to the base bias (PEFT's merge with lora_bias)."""
        bias = self.modules[module].bias
        assert bias is not None, module
        b = self.file.read(bias)
        self.bytes_read += bias.nbytes
        require_finite_input(b, self.path, bias.name)
        return b.to(device=device, dtype=dtype) * self.modules[module].scale

    def read_saved(self, name: str) -> torch.Tensor:
        """A tensor saved whole (`modules_to_save`, a `base_layer`), by its name in the file
        without PEFT's prefix, as stored."""
        info = self.saved[name]
        self.bytes_read += info.nbytes
        return self.file.read(info)

    def at_scale_one(self, module: str, dtype: torch.dtype = torch.float32) -> LoraFactors:
        """A module's factors with the scale folded into B (and into its bias): what an adapter
        written at scale 1 holds to make the same update."""
        m = self.modules[module]
        left, right, scale = self.matrix_factors(module, dtype=torch.float64)
        bias = None if m.bias is None else self.bias_delta(module, dtype=torch.float64).to(dtype)
        return LoraFactors(a=right.to(dtype), b=(left * scale).to(dtype), embedding=m.embedding, bias=bias)

    def delta(self, module: str, device: Device = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense update in the base weight's storage layout: what `merge_and_unload` adds."""
        m = self.modules[module]
        a, b, scale = self.factors(module, device, dtype)
        delta = (b @ a) * scale
        return delta.T if (m.fan_in_fan_out or m.embedding) else delta

    def __repr__(self) -> str:
        saved = f", {len(self.saved)} saved tensors" if self.saved else ""
        return f"LoraAdapter({str(self.path)!r}, {len(self.modules)} modules{saved})"


def _weights_file(folder: Path) -> SafetensorsFile:
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        if (folder / "adapter_model.bin").is_file():
            raise NotACheckpoint("adapter_model.bin is not supported; save the adapter with safetensors", folder)
        raise NotACheckpoint("adapter_model.safetensors is missing", folder)
    return SafetensorsFile(weights)


def _check_factor_shapes(a: TensorInfo, b: TensorInfo, rank: int, path: Path, module: str) -> None:
    """A is r×in and B out×r, both 2-D and floating, with the r that adapter_config gives."""
    for info, role in ((a, "A"), (b, "B")):
        if len(info.shape) != 2 or not info.is_float:
            raise CorruptCheckpoint(
                f"LoRA factor {role} ({info.name}) is {info.dtype} {list(info.shape)}, not a floating-point matrix",
                path,
                module,
            )
    wrong = [
        f"{role} ({info.name}) has rank {r}"
        for info, role, r in ((a, "A", a.shape[0]), (b, "B", b.shape[1]))
        if r != rank
    ]
    if wrong:
        raise CorruptCheckpoint(f"{'; '.join(wrong)} but adapter_config gives r={rank}", path, module)


class AdaptedCheckpoint(Checkpoint):
    """Base weights with an adapter's changes applied on the fly: W' = W + s·B·A, a LoRA bias
    b' = b + s·b_B, and tensors of saved modules replaced by the adapter's own (one the base
    lacks, such as a new classification head, is a tensor only this checkpoint has)."""

    def __init__(self, base: Checkpoint, adapter: LoraAdapter):
        super().__init__(adapter.path, base.config)
        self.base = base
        self.adapter = adapter
        self.read_ahead = base.read_ahead or not isinstance(adapter.file, TensorStore)
        by_key = {canonical_name(n): n for n in base.names()}

        def base_name(name: str, what: str) -> str:
            found = by_key.get(canonical_name(name))
            if found is None:
                raise CorruptCheckpoint(f"adapter {what} a tensor the base does not have", adapter.path, name)
            return found

        self.module_of: dict[str, str] = {}  # base weight -> adapter module (ΔW = s·B·A)
        self.bias_of: dict[str, str] = {}  # base bias -> adapter module (Δb = s·b_B)
        self.saved_of: dict[str, str] = {}  # base tensor -> the adapter's saved tensor that replaces it
        for module, m in adapter.modules.items():
            name = base_name(m.weight_name, "targets")
            expected = base.info(name).shape
            got = (m.a.shape[1], m.b.shape[0]) if m.embedding else (m.b.shape[0], m.a.shape[1])
            if m.fan_in_fan_out and not m.embedding:
                got = got[::-1]
            if tuple(expected) != got:
                raise ShapeMismatch(
                    f"adapter update is {list(got)} but the base weight is {list(expected)}; "
                    "is this adapter for another base?",
                    adapter.path,
                    name,
                )
            self.module_of[name] = module
            if m.bias is not None:
                bias = base_name(m.bias_name, "has a LoRA bias for")
                if tuple(base.info(bias).shape) != m.bias.shape:
                    raise ShapeMismatch(
                        f"adapter's LoRA bias is {list(m.bias.shape)} but the base bias is "
                        f"{list(base.info(bias).shape)}",
                        adapter.path,
                        bias,
                    )
                self.bias_of[bias] = module
        self.__infos = dict(base._infos)
        for saved, info in adapter.saved.items():  # what the base lacks, or has in another shape, matching reports
            model_name = saved.replace(_BASE_LAYER, ".")
            name = by_key.get(canonical_name(model_name), model_name)
            self.saved_of[name] = saved
            self.__infos[name] = info

    @property
    def folder(self) -> Path | None:
        return self.base.folder

    @property
    def _infos(self) -> dict[str, TensorInfo]:
        return self.__infos

    def formed_whole(self, name: str) -> bool:
        return self.changes(name)

    def changes(self, name: str) -> bool:
        """True when the adapter changes base tensor `name` (no tensor is read)."""
        return name in self.module_of or name in self.bias_of or name in self.saved_of

    def changes_densely(self, name: str) -> bool:
        """True when the change of `name` is no LoRA product: a LoRA bias, or a saved tensor."""
        return name in self.bias_of or name in self.saved_of

    def stored(self, name: str) -> torch.Tensor:
        """The raw tensor `apply` starts from: the adapter's saved tensor, else the base's."""
        return self.adapter.read_saved(self.saved_of[name]) if name in self.saved_of else self.base.get(name)

    def apply(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """`stored(name)` as floating `weight` (on its device) with this adapter's update added, if any."""
        if name in self.module_of:
            return weight + self.adapter.delta(self.module_of[name], weight.device, weight.dtype)
        if name in self.bias_of:
            return weight + self.adapter.bias_delta(self.bias_of[name], weight.device, weight.dtype)
        return weight

    def get_rows(
        self,
        name: str,
        start: int,
        stop: int,
        device: Device = None,
        dtype: torch.dtype | None = None,
        into: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Rows of a tensor: read from the base where the adapter leaves it alone; one it changes
        is formed whole (W + s·B·A), so readers in row blocks take such tensors whole instead."""
        if not self.changes(name):
            return self.base.get_rows(name, start, stop, device, dtype, into)
        return self.get(name, device, dtype)[start:stop]

    def get(self, name: str, device: Device = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        if not self.changes(name):
            return self.base.get(name, device, dtype)
        raw = self.stored(name).to(device)
        if name not in self.module_of and name not in self.bias_of:  # saved whole, nothing added
            return raw.to(dtype) if dtype is not None and raw.is_floating_point() else raw
        return self.apply(name, raw.to(torch.float32 if dtype is None else dtype))
