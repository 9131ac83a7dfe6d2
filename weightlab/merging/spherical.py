"""Interpolation on the sphere beyond two whole tensors: NuSLERP (two tensors, row- or column-wise,
of task vectors when there is a base), Multi-SLERP (barycentric, any number), the Karcher mean
(the Riemannian mean of unit tensors, scaled back). Each is mergekit's method of that name; the
maths runs in float64 here (mergekit: float32), which moves results by float32's rounding only."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _unit_rows(x: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    unit: torch.Tensor = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp(min=eps)
    return unit


def nuslerp(
    t: float, v0: torch.Tensor, v1: torch.Tensor, row_wise: bool, flatten: bool, eps: float = 1e-8
) -> torch.Tensor:
    """SLERP of v0 to v1 at t (Shoemake 1985): of the flattened tensors (`flatten`), else of each row
    (each column with `row_wise`, mergekit's naming); sin((1−t)θ)/sin θ·v0 + sin(tθ)/sin θ·v1 with
    cos θ the vectors' cosine, linear where they are colinear (1 − cos²θ ≤ eps²)."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise and v0.ndim > 1:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    cos = (_unit_rows(v0) * _unit_rows(v1)).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * v0 + t * v1, spherical)
    if not flatten and row_wise and out.ndim > 1:
        out = out.transpose(0, -1)
    return out.reshape(shape)


def multislerp(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize_weights: bool, eps: float
) -> torch.Tensor:
    """Multi-SLERP (Goddard 2025): the weighted mean of the unit tensors, projected to the sphere;
    the tangent vectors there, weighted and summed, mapped back by the exponential map; scaled by
    the weighted mean of the norms. Two opposite tensors whose weighted unit mean vanishes: their
    weighted sum."""
    if len(tensors) == 1:
        return tensors[0]
    flat = torch.stack([t.reshape(-1) for t in tensors])
    w = torch.tensor(list(weights), dtype=flat.dtype, device=flat.device)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.linalg.vector_norm(flat, dim=-1, keepdim=True)
    if not bool(norms.any()):  # every tensor zero (no task moved it): zero, where mergekit fails
        return torch.zeros_like(tensors[0])
    units = flat / (norms + eps)
    mean = (units * w[:, None]).sum(0)
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:
        if len(tensors) == 2:
            return (flat[0] * w[0] + flat[1] * w[1]).reshape(tensors[0].shape)
        raise ValueError("the weighted mean of the unit tensors is zero (opposite tensors that cancel)")
    mean = mean / mean_norm
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    step = (tangents * w[:, None]).sum(0)
    length = torch.linalg.vector_norm(step) + eps
    result = mean * torch.cos(length) + step * (torch.sin(length) / length)
    scaled: torch.Tensor = result * (norms.squeeze(-1) * w).sum()
    return scaled.reshape(tensors[0].shape)


def karcher_mean(tensors: Sequence[torch.Tensor], max_iter: int, tol: float) -> torch.Tensor:
    """The Karcher (Riemannian) mean of the unit tensors with equal weights, by its fixed-point
    iteration on the sphere (Karcher 1977; mergekit's `karcher`), scaled by the mean norm. Tensors
    of norm ≤ tol take no part in the direction; a step shorter than tol ends the iteration. The
    steps run in the tensors' dtype, as mergekit's do: near a common direction (θ ≈ tol) whether a
    tensor pulls at all depends on that rounding."""
    n = len(tensors)
    if n == 1:
        return tensors[0]
    norms = [torch.linalg.vector_norm(t) for t in tensors]
    units = [t / norm if float(norm) > 0 else torch.zeros_like(t) for t, norm in zip(tensors, norms)]
    valid = [u for u, norm in zip(units, norms) if float(norm) > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    alpha = 1.0 / len(valid)
    mean = sum((alpha * u for u in valid), torch.zeros_like(valid[0]))
    mean_norm = torch.linalg.vector_norm(mean)
    mean = valid[0].clone() if float(mean_norm) < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for u in valid:
            dot = torch.clamp(torch.dot(mean.reshape(-1), u.reshape(-1)), -1.0, 1.0)
            theta = torch.arccos(dot)
            if float(theta) < tol:
                continue
            tangent += alpha * (theta / torch.sin(theta)) * (u - dot * mean)
        length = torch.linalg.vector_norm(tangent)
        if float(length) < tol:
            break
        mean = torch.cos(length) * mean + torch.sin(length) * (tangent / length)
        unit_norm = torch.linalg.vector_norm(mean)
        if float(unit_norm) > tol:
            mean = mean / unit_norm
    scale: torch.Tensor = sum(norms, torch.zeros(())) / n
    return scale * mean
