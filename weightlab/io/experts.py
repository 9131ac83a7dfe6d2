"""Mixture-of-Experts layouts: a fused expert tensor is E matrices, never one.

transformers (v5) holds each MoE layer's experts in two 3-D tensors: `mlp.experts.gate_up_proj`
and `mlp.experts.down_proj`. Their orientation and how gate and up share one tensor depend on
the architecture (facts from transformers' modelling code):

| family | gate_up_proj | gate, up | down_proj |
|---|---|---|---|
| Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek, OLMoE, … (out × in) | [E, 2I, H] | first I rows, last I | [E, H, I] |
| Llama 4 (in × out) | [E, H, 2I] | first I columns, last I | [E, I, H] |
| gpt-oss (in × out, biased) | [E, H, 2I] | even columns, odd ones | [E, I, H] |

`ExpertView` shows such a checkpoint as its per-expert matrices, out × in, under the names a
per-expert checkpoint has (`mlp.experts.5.gate_proj.weight`, transformers' saved layout), so a
fused model in memory and the same model saved per expert give the same names and the same
figures. A tensor of more than two dimensions that is neither an expert layout nor a convolution
kernel is never read as a matrix (`naming.as_matrix` refuses it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

import torch

from weightlab.errors import CorruptCheckpoint, InvalidArgument
from weightlab.io.checkpoint import Checkpoint, CheckpointView
from weightlab.io.safetensors_file import TensorInfo
from weightlab.model_config import ModelConfig
from weightlab.naming import canonical_name, expert_site, router_block

FUSED = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<kind>gate_up_proj|down_proj)(?P<bias>_bias)?$")
IN_BY_OUT = {"gpt_oss", "llama4", "llama4_text"}  # families that store experts in × out
INTERLEAVED = {"gpt_oss"}  # gate and up alternate along the columns


@dataclass(frozen=True)
class ExpertPart:
    """One expert's matrix (or bias) inside a fused tensor."""

    fused: str  # the fused tensor's name
    expert: int
    part: str  # gate_proj, up_proj or down_proj
    bias: bool
    transposed: bool  # stored in × out
    half: int  # for gate_up: 0 gate, 1 up; -1 for down
    interleaved: bool
    shape: tuple[int, ...]  # of the part, as read (out × in; a bias: out)

    def take(self, expert: torch.Tensor) -> torch.Tensor:
        """This part of one expert's slice of the fused tensor (its [1:] dimensions)."""
        x = expert
        if self.half >= 0:
            along = -1 if (self.transposed or self.bias) else 0
            size = x.shape[along] // 2
            if self.interleaved:
                x = x[..., self.half :: 2] if along == -1 else x[self.half :: 2]
            else:
                x = x.narrow(along, self.half * size, size)
        if self.transposed and not self.bias:
            x = x.T
        return x.contiguous()

    def put(self, fused: torch.Tensor, value: torch.Tensor) -> None:
        """Write this part (out × in, as `take` gives it) into its place in `fused` (all experts)."""
        target = fused[self.expert]
        value = value.T if self.transposed and not self.bias else value
        if self.half < 0:
            target.copy_(value)
            return
        along = -1 if (self.transposed or self.bias) else 0
        size = target.shape[along] // 2
        if self.interleaved:
            (target[..., self.half :: 2] if along == -1 else target[self.half :: 2]).copy_(value)
        else:
            target.narrow(along, self.half * size, size).copy_(value)


def virtual_name(prefix: str, expert: int, part: str, bias: bool) -> str:
    return f"{prefix}.{expert}.{part}.{'bias' if bias else 'weight'}"


def fused_parts(name: str, shape: tuple[int, ...], config: ModelConfig | None) -> dict[str, ExpertPart] | None:
    """The per-expert parts of a fused expert tensor (virtual name -> part), None for any other
    tensor; CorruptCheckpoint when its shape fits no layout of its family."""
    found = FUSED.match(name)
    if not found or len(shape) != (2 if found["bias"] else 3):
        return None
    model_type = (config.model_type if config else None) or ""
    transposed, interleaved = model_type in IN_BY_OUT, model_type in INTERLEAVED
    experts, bias = shape[0], bool(found["bias"])
    gate_up = found["kind"] == "gate_up_proj"
    sizes: dict[str, tuple[int, ...]]
    if bias:
        out = shape[1]
        if gate_up and out % 2:
            raise CorruptCheckpoint(f"fused gate/up bias {list(shape)} does not split in two", None, name)
        sizes = {"gate_proj": (out // 2,), "up_proj": (out // 2,)} if gate_up else {"down_proj": (out,)}
    else:
        rows, cols = (shape[2], shape[1]) if transposed else (shape[1], shape[2])  # out × in
        if gate_up and rows % 2:
            raise CorruptCheckpoint(
                f"fused gate/up experts {list(shape)}: {rows} outputs do not split in two", None, name
            )
        sizes = (
            {"gate_proj": (rows // 2, cols), "up_proj": (rows // 2, cols)} if gate_up else {"down_proj": (rows, cols)}
        )
    return {
        virtual_name(found["prefix"], e, part, bias): ExpertPart(
            name, e, part, bias, transposed, (0 if part == "gate_proj" else 1) if gate_up else -1, interleaved, size
        )
        for e in range(experts)
        for part, size in sizes.items()
    }


class ExpertView(CheckpointView):
    """A checkpoint whose fused expert tensors read as per-expert matrices (everything else as
    it is). One expert is read at a time: a fused tensor's experts are its first dimension."""

    def __init__(self, inner: Checkpoint, parts: dict[str, ExpertPart]):
        super().__init__(inner)
        self.parts = parts
        fused = {p.fused for p in parts.values()}
        infos: dict[str, TensorInfo] = {}
        for name in inner.names():
            if name not in fused:
                infos[name] = inner.info(name)
        for virtual, part in parts.items():
            stored = inner.info(part.fused)
            size = stored.nbytes // stored.shape[0] * _numel(part.shape) // _numel(stored.shape[1:])
            infos[virtual] = TensorInfo(virtual, part.shape, stored.dtype, stored.file, -1, size)
        self._view_infos = dict(sorted(infos.items()))
        self._last: tuple[tuple[str, int], torch.Tensor] | None = None  # gate and up share one read

    def _remapped(self, name: str) -> bool:
        return name in self.parts

    def _read_remapped(self, info: TensorInfo) -> torch.Tensor:
        part = self.parts[info.name]
        key = (part.fused, part.expert)
        if self._last is None or self._last[0] != key:
            self._last = (key, self.inner.get_rows(part.fused, part.expert, part.expert + 1)[0])
        return part.take(self._last[1])


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def per_expert(ckpt: Checkpoint) -> Checkpoint:
    """`ckpt` with its fused expert tensors as per-expert matrices, or `ckpt` itself when it has none."""
    parts: dict[str, ExpertPart] = {}
    for name in ckpt.names():
        try:
            found = fused_parts(name, tuple(ckpt.info(name).shape), ckpt.config)
        except CorruptCheckpoint as e:
            raise CorruptCheckpoint(e.message, ckpt.path, name) from None
        if found:
            parts.update(found)
    return ExpertView(ckpt, parts) if parts else ckpt


@dataclass
class MoEBlock:
    """Where one MoE block's tensors live in a checkpoint (its per-expert view, `per_expert`)."""

    parts: dict[str, dict[int, str]] = field(default_factory=dict)  # part -> expert -> tensor name
    router: str | None = None
    shared: list[str] = field(default_factory=list)  # shared experts' tensors (not routed)

    @property
    def experts(self) -> int:
        return len(next(iter(self.parts.values())))


def moe_blocks(ckpt: Checkpoint, include: str | None = None, exclude: str | None = None) -> dict[str, MoEBlock]:
    """Each MoE block of a per-expert checkpoint (`per_expert`) by canonical block name
    (`layers.3.mlp`): its routed experts' matrices, its router, its shared experts; names filtered
    by the `include` / `exclude` regexes. A block whose experts are not numbered 0…E−1 with every
    part is refused by name."""
    keep, drop = (re.compile(include) if include else None), (re.compile(exclude) if exclude else None)
    blocks: dict[str, MoEBlock] = {}
    for name in ckpt.names():
        if (keep and not keep.search(name)) or (drop and drop.search(name)):
            continue
        found = expert_site(name)
        if found and len(ckpt.info(name).shape) == 2:
            block, e, part = found
            blocks.setdefault(block, MoEBlock()).parts.setdefault(part, {})[e] = name
        elif (scored := router_block(name)) is not None:
            blocks.setdefault(scored, MoEBlock()).router = name
        elif ".shared_expert" in canonical_name(name):
            blocks.setdefault(canonical_name(name).split(".shared_expert", 1)[0], MoEBlock()).shared.append(name)
    blocks = {b: s for b, s in blocks.items() if s.parts}
    for block, site in blocks.items():
        experts = set().union(*(set(p) for p in site.parts.values()))
        for part, by_expert in site.parts.items():
            if set(by_expert) != experts or experts != set(range(len(experts))):
                missing = sorted(set(range(max(experts) + 1)) - set(by_expert))
                raise InvalidArgument(
                    f"MoE block {block}: experts {missing} have no {part}: the experts are not numbered 0…E−1 "
                    "with every part",
                    ckpt.path,
                )
            shapes = {tuple(ckpt.info(name).shape) for name in by_expert.values()}
            if len(shapes) > 1:
                raise InvalidArgument(
                    f"MoE block {block}: the experts' {part} differ in shape ({', '.join(map(str, sorted(shapes)))}); "
                    "experts of one block are alike",
                    ckpt.path,
                )
    return blocks


_ROUTER_TENSOR = re.compile(r"^(?P<block>.+)\.(?:gate|router)\.(?:weight|bias|e_score_correction_bias)$")


def router_rows(name: str) -> str | None:
    """The MoE block whose experts a router tensor has one row (or entry) per, by canonical name:
    the router's weight, bias, or DeepSeek's score correction (`layers.3.mlp.gate.weight` ->
    "layers.3.mlp"); None for any other tensor. Its first dimension is the expert count."""
    found = _ROUTER_TENSOR.match(canonical_name(name))
    return found["block"] if found else None


class PermutedExperts(CheckpointView):
    """`inner` with the experts of some MoE blocks reordered: expert e of block b reads as inner's
    expert `orders[b][e]`, in every layout: per-expert tensors by name, fused tensors and the
    router's rows (weight, bias, DeepSeek's score correction) along their first dimension."""

    def __init__(self, inner: Checkpoint, orders: dict[str, list[int]]):
        super().__init__(inner)
        self.orders = orders
        by_site = {site: name for name in inner.names() if (site := expert_site(name)) is not None}
        self._source: dict[str, tuple[str, list[int] | None]] = {}
        for name in inner.names():
            key = canonical_name(name)
            site = expert_site(name)
            fused = FUSED.match(key)
            routed = router_rows(name)
            if site is not None and site[0] in orders:
                block, e, part = site
                self._source[name] = (by_site[(block, orders[block][e], part)], None)
            elif fused and fused["prefix"].removesuffix(".experts") in orders:
                self._source[name] = (name, orders[fused["prefix"].removesuffix(".experts")])
            elif routed in orders and inner.info(name).shape[:1] == (len(orders[routed]),):
                self._source[name] = (name, orders[routed])
        self._view_infos = {
            name: replace(info, offset=-1) if name in self._source else info
            for name in inner.names()
            for info in [inner.info(name)]
        }

    def _remapped(self, name: str) -> bool:
        return name in self._source

    def _read_remapped(self, info: TensorInfo) -> torch.Tensor:
        source, order = self._source[info.name]
        tensor = self.inner.get(source)
        return tensor[order].contiguous() if order is not None else tensor


class ModuleNames(CheckpointView):
    """`inner` with the tensors a transformers module holds under the module's own names, where
    the checkpoint spells them otherwise: fused expert tensors assembled from per-expert ones
    (transformers saves experts one by one and fuses them when it loads; `ExpertPart.put`), and
    tensors whose canonical name is the same (Mixtral's `block_sparse_moe.gate` is the module's
    `mlp.gate`). Everything `inner` holds reads as it is."""

    def __init__(self, inner: Checkpoint, wanted: dict[str, tuple[int, ...]]):
        super().__init__(inner)
        held = {canonical_name(n): n for n in inner.names()}
        infos = {n: inner.info(n) for n in inner.names()}
        self._alias: dict[str, str] = {}
        self._fused: dict[str, dict[str, ExpertPart]] = {}
        for key, shape in wanted.items():
            if key in infos:
                continue
            parts = fused_parts(key, shape, inner.config)
            if parts and all(canonical_name(v) in held for v in parts):
                self._fused[key] = {held[canonical_name(v)]: p for v, p in parts.items()}
                first = inner.info(next(iter(self._fused[key])))
                infos[key] = TensorInfo(
                    key, shape, first.dtype, first.file, -1, first.nbytes * _numel(shape) // max(1, _numel(first.shape))
                )
            elif canonical_name(key) in held and tuple(inner.info(held[canonical_name(key)]).shape) == shape:
                self._alias[key] = held[canonical_name(key)]
                infos[key] = replace(inner.info(self._alias[key]), name=key)
        self._view_infos = infos

    def _remapped(self, name: str) -> bool:
        return name in self._alias or name in self._fused

    def _read_remapped(self, info: TensorInfo) -> torch.Tensor:
        if info.name in self._alias:
            return self.inner.get(self._alias[info.name])
        fused: torch.Tensor | None = None
        for name, part in self._fused[info.name].items():  # each per-expert tensor read once
            value = self.inner.get(name)
            if fused is None:
                fused = torch.empty(info.shape, dtype=value.dtype)
            part.put(fused, value)
        assert fused is not None  # a fused tensor has one part per expert at least
        return fused
