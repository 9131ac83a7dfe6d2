"""Write PEFT LoRA adapter folders that `PeftModel.from_pretrained` loads as is."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from weightlab.errors import InvalidArgument
from weightlab.io.atomic import atomic_path
from weightlab.io.safetensors_file import write_safetensors


@dataclass
class LoraFactors:
    """One module's factors in the math orientation: ΔW (out×in) = s·B·A, A r×in, B out×r."""

    a: torch.Tensor
    b: torch.Tensor
    embedding: bool = False  # stored as lora_embedding_A = Aᵀ-side factors (see `to_peft`)
    bias: torch.Tensor | None = None  # lora_B's bias (PEFT's lora_bias): the module's bias moves by s·bias

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass
class NewAdapter:
    """An adapter an operation made, not yet written: its modules' factors at one LoRA scale, the
    whole tensors of its saved modules, and what PEFT needs to apply it. `write` makes the folder."""

    factors: dict[str, LoraFactors]
    scale: float
    base_model: str | None
    fan_in_fan_out: bool = False
    saved: dict[str, torch.Tensor] = field(default_factory=dict)

    report: Any = field(default=None, repr=False, compare=False)  # the result of the operation that made it
    residual: dict[str, torch.Tensor] | None = field(default=None, repr=False, compare=False)  # init-lora's base

    def write(
        self, out_dir: str | Path, sidecar: dict[str, Any] | None = None, files: Mapping[str, str] | None = None
    ) -> None:
        write_adapter(
            out_dir,
            self.factors,
            scale=self.scale,
            base_model=self.base_model,
            fan_in_fan_out=self.fan_in_fan_out,
            sidecar=sidecar,
            saved=self.saved,
            files=files,
        )

    def __repr__(self) -> str:
        ranks = sorted({f.rank for f in self.factors.values()})
        saved = f", {len(self.saved)} saved tensors" if self.saved else ""
        return (
            f"NewAdapter({len(self.factors)} modules, rank {', '.join(map(str, ranks))}, scale {self.scale:g}"
            f"{saved}, base {self.base_model!r})"
        )

    def config(self) -> dict[str, Any]:
        """What `adapter_config.json` holds (`peft.LoraConfig(**config)` takes it)."""
        return adapter_contents(self.factors, self.scale, self.base_model, self.fan_in_fan_out, self.saved)[0]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What `adapter_model.safetensors` holds, by PEFT's names."""
        return adapter_contents(self.factors, self.scale, self.base_model, self.fan_in_fan_out, self.saved)[1]

    def to_peft(self, model: Any, adapter_name: str = "default") -> Any:
        """`model` (a transformers model of the base) wrapped by PEFT with this adapter loaded, as
        `PeftModel.from_pretrained` would load it from the folder `write` makes. PEFT injects the
        adapter into `model` itself."""
        from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

        config = {k: v for k, v in self.config().items() if k not in ("peft_type", "lora_bias") or v}
        peft_model = get_peft_model(model, LoraConfig(**config), adapter_name=adapter_name)
        set_peft_model_state_dict(peft_model, self.state_dict(), adapter_name=adapter_name)
        return peft_model


def peft_tensors(module: str, f: LoraFactors) -> dict[str, torch.Tensor]:
    """PEFT's key names and layouts. For an embedding (vocab×dim matrix M = s·B·A in our
    orientation), PEFT stores lora_embedding_A (r×vocab) and lora_embedding_B (dim×r) with
    ΔW = s·(B_e A_e)ᵀ, so A_e = Bᵀ and B_e = Aᵀ."""
    prefix = f"base_model.model.{module}"
    if f.embedding:
        return {f"{prefix}.lora_embedding_A": f.b.T.contiguous(), f"{prefix}.lora_embedding_B": f.a.T.contiguous()}
    bias = {} if f.bias is None else {f"{prefix}.lora_B.bias": f.bias.contiguous()}
    return {f"{prefix}.lora_A.weight": f.a.contiguous(), f"{prefix}.lora_B.weight": f.b.contiguous(), **bias}


def adapter_contents(
    factors: dict[str, LoraFactors],
    scale: float,
    base_model: str | None,
    fan_in_fan_out: bool = False,
    saved: Mapping[str, torch.Tensor] | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The adapter's config and tensors by PEFT's names (see `write_adapter`)."""
    saved = dict(saved or {})
    if not factors or any(f.rank < 1 for f in factors.values()):
        raise InvalidArgument("an adapter needs at least one module of rank ≥ 1; nothing to write")
    ranks = [f.rank for f in factors.values()]
    r = max(set(ranks), key=lambda x: (ranks.count(x), x))
    rank_pattern = {m: f.rank for m, f in factors.items() if f.rank != r}
    lora_bias = any(f.bias is not None for f in factors.values())
    alpha = scale * r
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(factors),
        "rank_pattern": rank_pattern,
        "alpha_pattern": {m: scale * rank for m, rank in rank_pattern.items()},
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "lora_dropout": 0.0,
        "use_rslora": False,
        "use_dora": False,
        # the factors are already in the file: PEFT must not re-run an initialisation on load
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": sorted({n.rpartition(".")[0] for n in saved if ".base_layer." not in n}) or None,
        **({"lora_bias": True} if lora_bias else {}),
    }
    tensors: dict[str, torch.Tensor] = {}
    for module, f in factors.items():
        if lora_bias and f.bias is None and not f.embedding:
            f = replace(f, bias=f.b.new_zeros(f.b.shape[0]))
        tensors.update({k: v.to(dtype).cpu() for k, v in peft_tensors(module, f).items()})
    tensors.update({f"base_model.model.{name}": t.cpu().contiguous() for name, t in saved.items()})
    return config, tensors


def write_adapter(
    out_dir: str | Path,
    factors: dict[str, LoraFactors],
    *,
    scale: float,
    base_model: str | None,
    fan_in_fan_out: bool = False,
    dtype: torch.dtype = torch.float32,
    sidecar: dict[str, Any] | None = None,
    force: bool = False,
    saved: Mapping[str, torch.Tensor] | None = None,
    files: Mapping[str, str] | None = None,
) -> None:
    """Write `adapter_config.json` and `adapter_model.safetensors` (atomically).

    Every module gets the LoRA scale `scale` = alpha/r: the most common rank becomes `r` with
    lora_alpha = scale·r, and modules of other ranks go to `rank_pattern` with their own
    alpha (scale·r_m) in `alpha_pattern`. With a bias on any module, `lora_bias` is on (the
    others get zero biases); `saved` tensors (by their name in an adapter file, without PEFT's
    prefix; kept in their dtype) are written whole, their modules listed in `modules_to_save`
    (except a targeted module's `base_layer` tensors, which PEFT loads as they are).
    """
    config, tensors = adapter_contents(factors, scale, base_model, fan_in_fan_out, saved, dtype)
    with atomic_path(out_dir, force, directory=True) as tmp:
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        write_safetensors(tmp / "adapter_model.safetensors", tensors, {"format": "pt"})
        if sidecar is not None:
            (tmp / "weightlab_lora.json").write_text(json.dumps(sidecar, indent=2) + "\n")
        for name, text in (files or {}).items():  # records beside the adapter (e.g. weightlab_merge.yml)
            (tmp / name).write_text(text)
