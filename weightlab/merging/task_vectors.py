"""Task vectors τ_i = θ_i − θ_b as the merge methods read them: one at a time, in a reused buffer."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from weightlab.compute.scratch import buffer


def task_vectors(base: torch.Tensor, models: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    """τ_i = θ_i − θ_b one at a time, in one reused buffer (valid until the next is asked for). A
    model stored narrower than the maths (bfloat16 blocks) is first cast into the buffer: the
    same bits as the mixed-dtype subtraction, which takes torch's slow promoting path (5× the
    time of cast and subtract)."""
    out = buffer("task-vector", base.shape, base.dtype, base.device)
    for m in models:
        yield task_vector_into(out, m, base)


def task_vector_into(out: torch.Tensor, model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """τ = θ − θ_b written into `out` (a model stored narrower is cast there first)."""
    return torch.sub(model, base, out=out) if model.dtype == base.dtype else out.copy_(model).sub_(base)
