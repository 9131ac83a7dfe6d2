"""Matching the experts of MoE models before a merge: fine-tunes whose experts were not kept in
the same order (expert 3 of one model is expert 5 of another) are merged expert to matching
expert, not index to index.

For each MoE block, the similarity of the reference's expert e and a model's expert f is the
cosine of their whole weights (gate, up and down in one vector, `analysis.experts`); the
permutation π maximising Σ_e cos(e, π(e)) is found by the Hungarian method (Kuhn 1955; scipy's
`linear_sum_assignment`, exact), and the model is read through it (`io.experts.PermutedExperts`:
its experts and its router's rows reordered together, so the model computes the same function).
This is the weight-matching step of Git Re-Basin (Ainsworth et al. 2023, §3.2) applied to the
one permutation an MoE layer has as a symmetry: the order of its experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from weightlab.compute.similarity import expert_cosines
from weightlab.errors import InvalidArgument
from weightlab.io.checkpoint import Checkpoint
from weightlab.io.experts import PermutedExperts, moe_blocks, per_expert


@dataclass(frozen=True)
class ExpertOrder:
    """One model's expert order in one block, and how well it matches the reference."""

    order: list[int]  # the model's expert read as expert e
    matched_cosine: float  # mean cos(e, π(e)) over the experts
    index_cosine: float  # mean cos(e, e): the merge without matching


def expert_orders(reference: Checkpoint, model: Checkpoint, where: str) -> dict[str, ExpertOrder]:
    """Per MoE block of `reference`, the order of `model`'s experts that best matches it."""
    ref_blocks, blocks = moe_blocks(per_expert(reference)), moe_blocks(per_expert(model))
    ref_view, view = per_expert(reference), per_expert(model)
    out = {}
    for block, ref_site in ref_blocks.items():
        site = blocks.get(block)
        if site is None or site.experts != ref_site.experts or set(site.parts) != set(ref_site.parts):
            raise InvalidArgument(
                f"--match-experts: MoE block {block} has {ref_site.experts} experts with {sorted(ref_site.parts)} "
                f"in the reference, {'none' if site is None else f'{site.experts} with {sorted(site.parts)}'} here",
                where,
            )
        cosine = expert_cosines(ref_view, ref_site, view, site)
        rows, cols = linear_sum_assignment(-cosine)
        order = [int(c) for _, c in sorted(zip(rows, cols))]
        out[block] = ExpertOrder(
            order,
            float(np.mean([cosine[e, f] for e, f in enumerate(order)])),
            float(np.mean(np.diag(cosine))),
        )
    return out


def matched(
    reference: Checkpoint, models: list[Checkpoint], names: list[str]
) -> tuple[list[Checkpoint], dict[str, dict[str, ExpertOrder]]]:
    """Each model read with its experts in the order that matches `reference`'s (the model itself
    where every block is in order already), and the orders found, by model name and block."""
    if not moe_blocks(per_expert(reference)):
        raise InvalidArgument("--match-experts: the models have no Mixture-of-Experts block", reference.path)
    out, found = [], {}
    for model, name in zip(models, names):
        if model is reference:
            out.append(model)
            continue
        orders = expert_orders(reference, model, name)
        found[name] = orders
        moved = {block: o.order for block, o in orders.items() if o.order != sorted(o.order)}
        out.append(PermutedExperts(model, moved) if moved else model)
    return out, found
