"""Methods that decide entry by entry which task vectors count: SCE, RAM and RAM+, NearSwap, Arcee
Fusion. Each is mergekit's method of that name, on τ_i = θ_i − θ_b."""

from __future__ import annotations

from collections.abc import Sequence

import torch

QUANTILE_SAMPLE = 1_000_000  # Arcee Fusion's quantiles from at most this many entries


def sign_consensus(taus: torch.Tensor) -> torch.Tensor:
    """TIES' election by mass (Yadav et al. 2023, step 2) on stacked τ: the sign of Σ_i τ_i per
    entry, + where the sum is 0; true where τ_i has that sign (never where τ_i = 0)."""
    elected = torch.where(taus.sum(0) >= 0, 1.0, -1.0).to(taus.dtype)
    return taus.sign() == elected


def sce(base: torch.Tensor, models: Sequence[torch.Tensor], select_topk: float) -> torch.Tensor:
    """SCE (Wan et al. 2024, "FuseChat", §3.3): Select the top `select_topk` of the entries with
    non-zero variance across the τ_i (by variance); Calculate each τ_i's weight as its mean square
    over the sum of them; Erase the entries whose sign disagrees with the mass's; θ_b + Σ_i w_iτ_i·m_i
    / Σ_i w_i·m_i."""
    taus = torch.stack([m - base for m in models])
    if select_topk < 1:
        variance = taus.var(dim=0, unbiased=False)
        k = int(int(torch.count_nonzero(variance)) * select_topk) if select_topk > 0 else 0
        keep = torch.zeros(variance.numel(), dtype=torch.bool, device=taus.device)
        if k:
            keep[torch.topk(variance.abs().reshape(-1), k=k).indices] = True
        taus = taus * keep.reshape(variance.shape)
    agree = sign_consensus(taus)
    energy = taus.square().reshape(taus.shape[0], -1).mean(dim=1)
    total = float(energy.sum())
    weights = energy / total if abs(total) >= 1e-6 else torch.full_like(energy, 1 / len(models))
    weights = weights.reshape(-1, *([1] * (taus.ndim - 1))) * agree
    return base + (taus * weights).sum(0) / weights.sum(0).clamp(min=1e-6)


def ram(
    base: torch.Tensor, models: Sequence[torch.Tensor], epsilon: float, r: float = 0.0, alpha: float = 0.0
) -> torch.Tensor:
    """RAM (Reinforced Agent Merging, arXiv 2601.13572): an entry only one τ_i moves (|τ_i| > ε) keeps
    that τ_i whole; an entry several move is their mean over those. RAM+ (r > 0) scales each τ_i's
    own entries by λ_i = 1 + r·clip(ρ_i, 0, α), ρ_i the ratio of its shared to its own entries."""
    taus = torch.stack([m - base for m in models]).reshape(len(models), -1)
    moved = taus.abs() > epsilon
    counts = moved.sum(dim=0, keepdim=True)
    shared, alone = counts > 1, counts == 1
    scale = torch.ones(len(models), 1, dtype=taus.dtype, device=taus.device)
    if r:
        rho = (moved & shared).sum(dim=1) / (moved & alone).sum(dim=1).clamp(min=epsilon)
        scale = (1 + r * rho.clamp(min=0, max=alpha)).to(taus.dtype).unsqueeze(-1)
    kept = taus * moved
    merged = (kept * alone * scale + kept * shared / counts.clamp(min=1)).sum(dim=0)
    return base + merged.reshape(base.shape)


def nearswap(base: torch.Tensor, other: torch.Tensor, t: float) -> torch.Tensor:
    """NearSwap (alchemonaut 2024): move each entry of the base to the other model's by
    w = clip(t/|θ − θ_b|, 0, 1): entries already close (within t) take the other's value."""
    weight = (t / (base - other).abs().clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * other + (1 - weight) * base


def _quantiles(x: torch.Tensor, q: Sequence[float], generator: torch.Generator) -> list[float]:
    flat = x.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE:
        flat = flat[torch.randint(flat.numel(), (QUANTILE_SAMPLE,), generator=generator).to(flat.device)]
    ordered = torch.sort(flat).values
    return [float(ordered[int(p * (ordered.numel() - 1))]) for p in q]


def arcee_fusion(base: torch.Tensor, other: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Arcee Fusion (Arcee 2025): importance |θ − θ_b| times KL(softmax θ ‖ softmax θ_b) along the
    last dimension; the other model's change is kept where the importance reaches median + 1.5·IQR
    (Tukey's upper fence) of the tensor's importances (from a seeded sample of a million entries
    when larger)."""
    if base.numel() == 0:
        return base.clone()
    eps = 1e-8
    p = torch.softmax(other, dim=-1) + eps
    q = torch.softmax(base, dim=-1) + eps
    importance = (other - base).abs() * (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    q1, median, q3 = _quantiles(importance, (0.25, 0.5, 0.75), generator)
    keep = importance >= median + 1.5 * (q3 - q1)
    return base + (other - base) * keep
