"""Where an MoE model routes calibration text: how often each expert is picked, and REAP's saliency.

The model runs on the text (`merging.activations.Runner`: built by transformers from the config,
weights through weightlab's reader). Each MoE block's experts module is called by transformers as
experts(x, top_k_index, top_k_weights) in every MoE family of transformers 5 (Mixtral, Qwen2/3-MoE,
OLMoE, DeepSeek, gpt-oss, …); a hook reads those arguments on the real (non-padding) tokens:

- **routed share** of expert e: n_e / Σ_f n_f, n_e the (token, slot) pairs routed to e;
- **REAP saliency** (Lasby et al. 2025, *REAP the Experts: Why Pruning Prevails for One-Shot MoE
  Compression*, arXiv 2510.13999, the Router-weighted Expert Activation Pruning criterion):
  S_e = (1/|X_e|) Σ_{x∈X_e} g_e(x)·‖f_e(x)‖₂, X_e the tokens routed to e, g_e(x) the router's
  weight of e for x as the block applies it, f_e(x) the expert's output, computed by the module
  itself (the call with x routed to e alone, weight 1), so every family's activation and biases are
  its own. An expert no token reached has no saliency (None), never 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from weightlab.compute.activations import Runner
from weightlab.errors import InvalidArgument
from weightlab.io.calibration import CalibrationSet
from weightlab.io.checkpoint import Checkpoint
from weightlab.naming import canonical_name


@dataclass
class Routing:
    """One MoE block's routing on the calibration text."""

    tokens: int  # real tokens seen
    routed: list[int]  # (token, slot) pairs routed to each expert
    saliency: list[float | None]  # REAP's S_e; None for an expert never routed to

    @property
    def share(self) -> list[float]:
        total = sum(self.routed)
        return [n / total if total else 0.0 for n in self.routed]


def _experts_modules(model: Any) -> dict[str, Any]:
    """Each MoE block's experts module (one holding the fused expert weights), by canonical block."""
    return {
        canonical_name(f"{name}.weight").removesuffix(".experts.weight"): module
        for name, module in model.named_modules()
        if name.endswith(".experts") and hasattr(module, "gate_up_proj") and hasattr(module, "down_proj")
    }


def routing(ckpt: Checkpoint, calibration: CalibrationSet, tokenizer: str, device: torch.device) -> dict[str, Routing]:
    """Run `ckpt` on the calibration texts and count, per MoE block, where its tokens went."""
    runner = Runner.build(ckpt, tokenizer, device)
    runner.load(runner.named(ckpt).get)
    modules = _experts_modules(runner.model)
    if not modules:
        raise InvalidArgument(
            "--calibration: transformers builds this model with no fused experts module to watch "
            "(experts(x, top_k_index, top_k_weights))",
            ckpt.path,
        )
    counts = {b: torch.zeros(m.gate_up_proj.shape[0], dtype=torch.long) for b, m in modules.items()}
    sums = {b: torch.zeros(m.gate_up_proj.shape[0], dtype=torch.float64) for b, m in modules.items()}
    seen = {b: 0 for b in modules}
    real: list[torch.Tensor] = []  # the current batch's attention mask, flattened
    inside = [False]  # the hook's own calls of the module are not counted

    def watch(block: str) -> Any:
        def hook(module: Any, args: tuple[Any, ...], output: Any) -> None:
            if inside[0] or len(args) < 3:
                return
            x, index, weight = args[0], args[1], args[2]
            keep = real[0] if real and real[0].numel() == x.shape[0] else torch.ones(x.shape[0], dtype=torch.bool)
            x, index, weight = x[keep], index[keep], weight[keep]
            seen[block] += x.shape[0]
            inside[0] = True
            try:
                for e in index.unique().tolist():
                    rows, slots = torch.where(index == e)
                    counts[block][e] += rows.numel()
                    alone = module(
                        x[rows], torch.full((rows.numel(), 1), e), torch.ones(rows.numel(), 1, dtype=x.dtype)
                    )
                    sums[block][e] += float((weight[rows, slots].double() * alone.double().norm(dim=-1)).sum())
            finally:
                inside[0] = False

        return hook

    handles = [m.register_forward_hook(watch(b)) for b, m in modules.items()]
    try:
        with torch.no_grad():
            for batch in runner.batches(calibration.texts):
                real[:] = [batch["attention_mask"].reshape(-1).bool().cpu()]
                runner.model(**batch)
    finally:
        for h in handles:
            h.remove()
    return {
        b: Routing(
            seen[b],
            [int(n) for n in counts[b]],
            [float(s / n) if n else None for s, n in zip(sums[b].tolist(), counts[b].tolist())],
        )
        for b in modules
    }
