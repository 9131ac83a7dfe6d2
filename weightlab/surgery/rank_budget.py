"""Share a total LoRA rank among modules by their spectra (`--rank-budget N`).

Two rules, both scale-free (a module's share depends on the shape of its spectrum, not its norm),
every module getting at least 1 and at most its rank cap:

- `energy`: p_{m,i} = σ_{m,i}² / Σ_j σ_{m,j}², the share of module m's energy in its i-th
  direction; the N largest p over all modules are kept (each module's first direction always),
  so a module whose energy is spread over many directions gets more rank than one with a single
  dominant direction. This is the greedy choice that maximises the total kept energy share
  Σ_m Σ_{i ≤ r_m} p_{m,i} under Σ r_m = N (Eckart & Young 1936 per module).
- `entropy` (FlexLoRA, Liu, Si & Jia 2026, "Entropy-Guided Flexible Low-Rank Adaptation": matrix
  importance by spectral-energy entropy): H_m = −Σ_i p_{m,i} ln p_{m,i}; module m receives rank in
  proportion to its effective rank exp(H_m) (Roy & Vetterli 2007), rounded by largest remainder.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from weightlab.compute.spectra import energy_entropy
from weightlab.errors import InvalidArgument
from weightlab.options import RANK_RULES


def energy_shares(s: torch.Tensor) -> torch.Tensor:
    """σ_i² / Σσ², descending (zeros for a zero matrix)."""
    e = s.double() ** 2
    total = float(e.sum())
    return e / total if total > 0 else torch.zeros_like(e)


def spectral_entropy(s: torch.Tensor) -> float:
    """H = −Σ p ln p over the energy shares p of singular values s (0 for rank one or a zero matrix)."""
    return energy_entropy(s.double() ** 2)


def allocate_ranks(
    spectra: Mapping[str, torch.Tensor], budget: int, rule: str = "energy", caps: Mapping[str, int] | None = None
) -> dict[str, int]:
    """Ranks r_m ≥ 1 with Σ r_m = `budget`, r_m ≤ caps[m] (default: the number of non-zero σ),
    from each module's singular values (descending) by `rule`."""
    if rule not in RANK_RULES:
        raise InvalidArgument(f"--rank-allocation {rule!r}: must be one of {', '.join(RANK_RULES)}")
    names = list(spectra)
    cap = {m: min(int((spectra[m] > 0).sum()) or 1, (caps or {}).get(m, 10**9)) for m in names}
    if budget < len(names):
        raise InvalidArgument(
            f"--rank-budget {budget} is less than the {len(names)} modules targeted (each needs rank ≥ 1)"
        )
    if budget > sum(cap.values()):
        raise InvalidArgument(
            f"--rank-budget {budget} exceeds the {sum(cap.values())} directions the targeted "
            "modules have (the sum of their ranks)"
        )
    if rule == "energy":
        return _greedy(spectra, budget, cap)
    return _proportional({m: math.exp(spectral_entropy(spectra[m])) for m in names}, budget, cap)


def _greedy(spectra: Mapping[str, torch.Tensor], budget: int, cap: Mapping[str, int]) -> dict[str, int]:
    ranks = dict.fromkeys(spectra, 1)
    candidates = [
        (float(p), m, i) for m in spectra for i, p in enumerate(energy_shares(spectra[m]).tolist()) if 1 <= i < cap[m]
    ]
    candidates.sort(key=lambda c: (-c[0], c[1], c[2]))  # ties: by name, then position (deterministic)
    for _, m, _ in candidates[: budget - len(ranks)]:
        ranks[m] += 1
    return ranks


def _proportional(weight: Mapping[str, float], budget: int, cap: Mapping[str, int]) -> dict[str, int]:
    """Largest-remainder rounding of the targets t_m = budget·w_m/Σw within 1 ≤ r_m ≤ cap_m: start
    from ⌊t_m⌋ (clamped), then add one where t_m − r_m is largest (or take one where it is most
    negative) until Σ r_m = budget."""
    total = sum(weight.values())
    target = {m: budget * (w / total if total > 0 else 1 / len(weight)) for m, w in weight.items()}
    ranks = {m: min(max(int(t), 1), cap[m]) for m, t in target.items()}
    while (gap := budget - sum(ranks.values())) != 0:
        if gap > 0:
            m = max((m for m in ranks if ranks[m] < cap[m]), key=lambda m: (target[m] - ranks[m], m))
            ranks[m] += 1
        else:
            m = max((m for m in ranks if ranks[m] > 1), key=lambda m: (ranks[m] - target[m], m))
            ranks[m] -= 1
    return ranks
