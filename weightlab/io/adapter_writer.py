"""Write PEFT LoRA adapter folders that `PeftModel.from_pretrained` loads as is."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from weightlab.io.atomic import atomic_path
from weightlab.io.safetensors_file import write_safetensors


@dataclass
class LoraFactors:
    """One module's factors in the math orientation: ΔW (out×in) = s·B·A, A r×in, B out×r."""

    a: torch.Tensor
    b: torch.Tensor
    embedding: bool = False  # stored as lora_embedding_A = Aᵀ-side factors (see `to_peft`)

    @property
    def rank(self) -> int:
        return self.a.shape[0]


def peft_tensors(module: str, f: LoraFactors) -> dict[str, torch.Tensor]:
    """PEFT's key names and layouts. For an embedding (vocab×dim matrix M = s·B·A in our
    orientation), PEFT stores lora_embedding_A (r×vocab) and lora_embedding_B (dim×r) with
    ΔW = s·(B_e A_e)ᵀ, so A_e = Bᵀ and B_e = Aᵀ."""
    prefix = f"base_model.model.{module}"
    if f.embedding:
        return {f"{prefix}.lora_embedding_A": f.b.T.contiguous(), f"{prefix}.lora_embedding_B": f.a.T.contiguous()}
    return {f"{prefix}.lora_A.weight": f.a.contiguous(), f"{prefix}.lora_B.weight": f.b.contiguous()}


def write_adapter(out_dir: str | Path, factors: dict[str, LoraFactors], *, scale: float, base_model: str | None,
                  fan_in_fan_out: bool = False, dtype: torch.dtype = torch.float32, sidecar: dict | None = None,
                  force: bool = False) -> None:
    """Write `adapter_config.json` and `adapter_model.safetensors` (atomically).

    Every module gets the LoRA scale `scale` = alpha/r: the most common rank becomes `r` with
    lora_alpha = scale·r, and modules of other ranks go to `rank_pattern` with their own
    alpha (scale·r_m) in `alpha_pattern`.
    """
    ranks = [f.rank for f in factors.values()]
    r = max(set(ranks), key=lambda x: (ranks.count(x), x))
    rank_pattern = {m: f.rank for m, f in factors.items() if f.rank != r}
    alpha = scale * r
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model, "r": r, "lora_alpha": alpha,
        "target_modules": sorted(factors), "rank_pattern": rank_pattern,
        "alpha_pattern": {m: scale * rank for m, rank in rank_pattern.items()},
        "fan_in_fan_out": fan_in_fan_out, "bias": "none", "lora_dropout": 0.0, "use_rslora": False, "use_dora": False,
        # the factors are already in the file: PEFT must not re-run an initialisation on load
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
    }
    tensors: dict[str, torch.Tensor] = {}
    for module, f in factors.items():
        tensors.update({k: v.to(dtype).cpu() for k, v in peft_tensors(module, f).items()})
    with atomic_path(out_dir, force, directory=True) as tmp:
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        write_safetensors(tmp / "adapter_model.safetensors", tensors, {"format": "pt"})
        if sidecar is not None:
            (tmp / "weightlab_lora.json").write_text(json.dumps(sidecar, indent=2) + "\n")
