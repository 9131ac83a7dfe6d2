"""NAN: merging coefficients from the inverse of parameter norms.

Si et al. 2025, "NAN: A Training-Free Solution to Coefficient Estimation in Model Merging"
(arXiv 2505.16148). For one linear layer fitted by least squares on each task i, the joint
optimum is W* = (Σ_i A_i)⁻¹ Σ_i A_i W_i with A_i = X_iᵀX_i: each model should weigh in
proportion to the task information it encodes. NAN estimates that weight without data as
c_i ∝ 1/‖θ_i‖^p, normalised.

The public text leaves choices open; ours are options with these defaults:
- `norm_of="weights"`: norm of the fine-tuned weights θ_i (the paper's parameter norm); or
  "task-vectors", ‖τ_i‖ = ‖θ_i − θ_base‖;
- `granularity="tensor"`: one coefficient set per tensor, following the per-layer
  least-squares derivation; or "model", one set from the norm over all merged tensors;
- `power=1`: c_i ∝ ‖·‖^(−p);
- `normalize="sum"`: Σ_i c_i = 1 (task arithmetic then adds a weighted mean of the task
  vectors, scaled by λ); or "count": Σ_i c_i = N (a weighted sum, as plain task arithmetic).
"""

from __future__ import annotations

from collections.abc import Sequence


def nan_coefficients(norms: Sequence[float], power: float = 1.0, normalize: str = "sum") -> list[float]:
    """c_i = k·‖θ_i‖^(−p) / Σ_j ‖θ_j‖^(−p), with k = 1 ("sum") or N ("count").

    A zero norm (a model identical to the base, when norming task vectors) carries no task
    information to estimate from: all such models share the weight equally with no one else.
    """
    if any(n == 0 for n in norms):
        zero = [1.0 if n == 0 else 0.0 for n in norms]
        inverse = zero
    else:
        inverse = [float(n) ** (-power) for n in norms]
    total = sum(inverse)
    scale = 1.0 if normalize == "sum" else float(len(norms))
    return [scale * x / total for x in inverse]
