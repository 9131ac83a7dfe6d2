"""Random drops of task-vector entries and how the kept ones are rescaled: DARE's uniform drop
and DELLA's magnitude-ranked drop (MAGPRUNE). Masks are drawn from a seeded CPU generator, so
every device gives the same mask.

Rescaling the kept entries (`rescale`): "inverse" divides each by the probability it was kept
(the papers' rule: E[result] = τ), "l1" scales the whole to τ's L1 norm (mergekit's rule), "none"
leaves them as they are.
"""

from __future__ import annotations

import torch

RESCALES = ("inverse", "l1", "none")
L1_FLOOR = 1e-7  # mergekit's: below it, a norm is zero and nothing is rescaled


def rescaled(tau: torch.Tensor, keep: torch.Tensor, probability: torch.Tensor | float, how: str) -> torch.Tensor:
    """τ's kept entries (boolean `keep`) rescaled as `how` says; dropped entries are 0."""
    masked = torch.where(keep, tau, torch.zeros_like(tau))
    if how == "inverse":
        return masked / probability
    if how == "l1":
        before, after = float(tau.abs().sum()), float(masked.abs().sum())
        return masked if before < L1_FLOOR or after < L1_FLOOR else masked * (before / after)
    return masked


def dare_drop(tau: torch.Tensor, density: float, generator: torch.Generator, rescale: str = "inverse") -> torch.Tensor:
    """DARE (Yu et al. 2024, "Language Models are Super Mario", eq. 2): keep each entry with
    probability `density` (Bernoulli), rescale the kept ones (`rescaled`)."""
    if density >= 1:
        return tau
    keep = torch.bernoulli(torch.full(tau.shape, density), generator=generator).to(tau.device, torch.bool)
    return rescaled(tau, keep, density, rescale)


def della_probabilities(tau: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """MAGPRUNE's keep probabilities (Deep et al. 2024, "DELLA-Merging", §3.1): within each row (a
    vector is one row), entries ranked by magnitude, the rank normalised to [0, 1], and
    p = density − ε + 2ε·rank: the largest entries are kept most often, at density on average."""
    rows = tau.reshape(1, -1) if tau.ndim < 2 else tau.reshape(tau.shape[0], -1)
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).to(torch.float32) + 1
    low, high = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    normalised = ((ranks - low) / (high - low)).nan_to_num(0.0).clamp(0, 1)  # one entry a row: rank 0
    return (density - epsilon + 2 * epsilon * normalised).reshape(tau.shape)


def della_drop(
    tau: torch.Tensor, density: float, epsilon: float, generator: torch.Generator, rescale: str = "inverse"
) -> torch.Tensor:
    """DELLA's MAGPRUNE (Deep et al. 2024, §3.1): keep each entry with its magnitude-ranked
    probability (`della_probabilities`), rescale the kept ones (`rescaled`; "inverse" divides each
    by its own probability, eq. 2)."""
    if density >= 1:
        return tau
    probability = della_probabilities(tau, density, epsilon)
    keep = torch.bernoulli(probability.cpu(), generator=generator).to(tau.device, torch.bool)
    return rescaled(tau, keep, probability.to(tau.device, tau.dtype), rescale)
