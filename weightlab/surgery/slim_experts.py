"""Slimming a Mixture-of-Experts model to K experts per MoE block, from its weights alone.

Per block, with cos(e, f) the cosine of whole experts (gate, up and down in one vector,
`analysis.experts`):

- **merge** (HC-SMoE, Chen et al. 2025, §3, from weights instead of outputs): average-linkage
  hierarchical clustering of the experts on 1 − cos, cut into exactly K clusters; each cluster
  becomes one expert, the mean of its members' weights, θ_g = (1/|g|) Σ_{e∈g} θ_e, and one router
  row, the mean of theirs, r_g = (1/|g|) Σ_{e∈g} r_e (a router bias, DeepSeek's score correction
  and gpt-oss's expert biases likewise). A cluster of near copies becomes the expert they share.
- **prune**: while more than K experts remain, of the two remaining experts most alike, the one
  whose router row is shorter goes (the router's weaker claim on the same function); the others
  are kept as they are, with their router rows.

Everything else is copied. The output keeps the input's layout (per-expert tensors renumbered
0…K−1 under their own spelling, or fused [K, …] tensors) and its config says K experts, so
transformers loads it as is. K below the experts each token is routed to (`num_experts_per_tok`)
is refused, as is a config that does not say how many experts there are.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy.cluster.hierarchy import cut_tree, linkage
from scipy.spatial.distance import squareform

from weightlab.compute.similarity import expert_cosines
from weightlab.errors import InvalidArgument
from weightlab.io.checkpoint import Checkpoint
from weightlab.io.experts import FUSED, moe_blocks, per_expert, router_rows
from weightlab.io.safetensors_file import torch_dtype
from weightlab.io.writer import CheckpointWriter, TensorSpec
from weightlab.naming import canonical_name, expert_site
from weightlab.options import SlimExpertsOptions
from weightlab.results import Result, Table

if TYPE_CHECKING:
    from weightlab.compute.routing import Routing

EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")  # config keys that hold E
Progress = Callable[..., None]


@dataclass
class SlimmedBlock:
    block: str
    experts: int  # before
    groups: list[list[int]]  # per output expert: the input experts it is made of
    dropped: list[int]  # pruned experts
    cosine_within: list[float | None]  # per output expert: mean pairwise cosine of its members (None: one)
    weights: list[list[float]] = field(default_factory=list)  # per output expert: each member's weight in the mean
    calibrated: bool = False  # chosen (prune) or weighed (merge) by the routing of calibration text


@dataclass
class SlimReport(Result):
    SCHEMA = "weightlab.slim-experts/1"
    TITLE = "Experts slimmed"
    REFERENCE = "Chen et al. 2025 (HC-SMoE, clustering experts to merge them)"
    ORDER = 63

    model: str
    out: str
    options: SlimExpertsOptions
    blocks: list[SlimmedBlock]
    config: dict[str, int] = field(default_factory=dict)  # config keys rewritten

    def tables(self) -> list[Table]:
        return [
            Table(
                f"Each MoE block slimmed to {self.options.experts} experts ({self._how()})",
                ["block", "experts", "merged groups", "mean cos within", "dropped"],
                [
                    [
                        b.block,
                        f"{b.experts} → {len(b.groups)}",
                        "; ".join("{" + ", ".join(map(str, g)) + "}" for g in b.groups if len(g) > 1) or "none",
                        _mean([c for c in b.cosine_within if c is not None]),
                        ", ".join(map(str, b.dropped)) or "none",
                    ]
                    for b in self.blocks
                ],
            )
        ]

    def _how(self) -> str:
        calibrated = any(b.calibrated for b in self.blocks)
        if self.options.by == "prune":
            return (
                "pruned by REAP saliency on calibration text" if calibrated else "pruned: the weaker of alike experts"
            )
        return "merged, weighted by routed share" if calibrated else "merged: clusters of alike experts, their mean"

    def headline(self) -> list[tuple[str, str, object]]:
        before = sorted({b.experts for b in self.blocks})
        return [
            ("slim.blocks", "MoE blocks slimmed", len(self.blocks)),
            ("slim.experts", "experts per block", f"{'/'.join(map(str, before))} → {self.options.experts}"),
            ("slim.by", "how", self._how()),
        ]

    def lines(self) -> list[str]:
        keys = ", ".join(f"{k} = {v}" for k, v in self.config.items())
        return [f"{len(self.blocks)} MoE blocks slimmed ({self._how()}); config: {keys} → {self.out}"]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def merge_groups(cosine: np.ndarray, k: int) -> list[list[int]]:
    """Exactly k clusters of average-linkage clustering on 1 − cos, each sorted, ordered by their
    first expert."""
    n = cosine.shape[0]
    if k >= n:
        return [[e] for e in range(n)]
    distance = np.clip(1.0 - (cosine + cosine.T) / 2, 0.0, 2.0)
    np.fill_diagonal(distance, 0.0)
    labels = cut_tree(linkage(squareform(distance, checks=False), "average"), n_clusters=k).ravel()
    groups: dict[int, list[int]] = {}
    for e, label in enumerate(labels):
        groups.setdefault(int(label), []).append(e)
    return sorted(groups.values(), key=lambda g: g[0])


def prune_groups(cosine: np.ndarray, router_norms: list[float], k: int) -> list[list[int]]:
    """The k experts left when, again and again, of the two remaining experts most alike the one
    with the shorter router row goes (the higher index on a tie)."""
    kept = list(range(cosine.shape[0]))
    while len(kept) > k:
        _, i, j = max((cosine[i, j], i, j) for a, i in enumerate(kept) for j in kept[a + 1 :])
        kept.remove(j if router_norms[j] <= router_norms[i] else i)
    return [[e] for e in kept]


def plan_slimming(
    ckpt: Checkpoint, options: SlimExpertsOptions, routes: dict[str, Routing] | None = None
) -> tuple[dict[str, SlimmedBlock], dict[str, Any]]:
    """Each MoE block's output experts (groups of input experts, with their weights in the
    mean), and the output's config. With `routes` (`analysis.routing` on calibration text):
    pruning keeps the K experts of highest REAP saliency, merging weighs each member by how often
    it was routed to."""
    k = options.experts
    if k is None:
        raise InvalidArgument("slim-experts: give --experts K, the experts each MoE block keeps")
    raw = dict(ckpt.config.raw) if ckpt.config is not None and ckpt.config.raw else {}
    keys = [key for key in EXPERT_COUNT_KEYS if isinstance(raw.get(key), int)]
    view = per_expert(ckpt)
    blocks = moe_blocks(view)
    if not blocks:
        raise InvalidArgument("slim-experts: no Mixture-of-Experts block in this model", ckpt.path)
    if not keys:
        raise InvalidArgument(
            f"slim-experts: the config says nothing of the expert count ({', '.join(EXPERT_COUNT_KEYS)}): "
            "the slimmed model's could not be made consistent",
            ckpt.path,
        )
    top_k = raw.get("num_experts_per_tok", raw.get("moe_topk"))
    if isinstance(top_k, int) and k < top_k:
        raise InvalidArgument(f"--experts {k}: each token is routed to {top_k} experts, so keep at least {top_k}")
    groups_of, picked = raw.get("n_group"), raw.get("topk_group")
    if isinstance(groups_of, int) and groups_of > 1:
        if k % groups_of:
            raise InvalidArgument(
                f"--experts {k}: the router picks among {groups_of} groups of experts; keep a multiple"
            )
        if isinstance(picked, int) and isinstance(top_k, int) and k // groups_of * picked < top_k:
            raise InvalidArgument(
                f"--experts {k}: the router takes {top_k} experts from {picked} of {groups_of} groups, so each group "
                f"needs at least {-(-top_k // picked)}: keep at least {groups_of * -(-top_k // picked)}"
            )
    counts = {site.experts for site in blocks.values()}
    if any(k >= e for e in counts):
        raise InvalidArgument(f"--experts {k}: the MoE blocks have {min(counts)} experts; keep fewer to slim them")
    planned = {}
    for block, site in blocks.items():
        cosine = expert_cosines(view, site)
        route = (routes or {}).get(block)
        if options.by == "merge":
            groups = merge_groups(cosine, k)
        elif route is not None:
            groups = reap_groups(route.saliency, k)
        else:
            norms = [float(r.norm()) for r in view.get(site.router).double()] if site.router else [1.0] * site.experts
            groups = prune_groups(cosine, norms, k)
        dropped = sorted(set(range(site.experts)) - {e for g in groups for e in g})  # none when merging
        within = [
            float(np.mean([cosine[a, b] for i, a in enumerate(g) for b in g[i + 1 :]])) if len(g) > 1 else None
            for g in groups
        ]
        weights = [_member_weights(g, route.routed if route is not None else None) for g in groups]
        planned[block] = SlimmedBlock(block, site.experts, groups, dropped, within, weights, route is not None)
    return planned, {key: k for key in keys}


def reap_groups(saliency: list[float | None], k: int) -> list[list[int]]:
    """The k experts of highest REAP saliency (an expert no token reached has none: it goes
    first; the lower index wins a tie), in their order."""
    score = [v if v is not None else -1.0 for v in saliency]  # saliency is ≥ 0
    ranked = sorted(range(len(score)), key=lambda e: (-score[e], e))
    return [[e] for e in sorted(ranked[:k])]


def _member_weights(group: list[int], routed: list[int] | None) -> list[float]:
    """Each member's weight in its group's mean: its share of the group's routings (HC-SMoE's
    frequency-weighted merging), uniform without calibration or when none was routed to."""
    counts = [routed[e] for e in group] if routed is not None else []
    total = sum(counts)
    return [c / total for c in counts] if total else [1.0 / len(group)] * len(group)


_RENUMBER = re.compile(r"(\.experts\.)(\d+)(\.)")


def _mean_of(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Σ w_i t_i of alike tensors (weights summing to 1), in float32, back in their dtype."""
    total = sum(w * t.float() for w, t in zip(weights, tensors))
    assert isinstance(total, torch.Tensor)
    return total.to(tensors[0].dtype)


def _grouped(t: torch.Tensor, block: SlimmedBlock) -> torch.Tensor:
    """[E, …] → [K, …]: each group's rows, weighted."""
    return torch.stack([_mean_of([t[e] for e in g], w) for g, w in zip(block.groups, block.weights)])


def slimmed_tensors(
    ckpt: Checkpoint, planned: dict[str, SlimmedBlock]
) -> tuple[list[TensorSpec], Callable[[str], torch.Tensor]]:
    """The output's tensors (name, shape, dtype) and how to make each: per-expert tensors
    renumbered from their group's first member, fused and router tensors [K, …], the rest copied."""
    by_site = {site: name for name in ckpt.names() if (site := expert_site(name)) is not None}
    makers: dict[str, Callable[[], torch.Tensor]] = {}
    shapes: list[TensorSpec] = []
    for name in ckpt.names():
        shape, dtype = tuple(ckpt.info(name).shape), _dtype(ckpt, name)
        site = expert_site(name)
        fused = FUSED.match(canonical_name(name))
        block = fused["prefix"].removesuffix(".experts") if fused else router_rows(name)
        if site is not None and site[0] in planned:
            groups = planned[site[0]].groups
            j = next((j for j, g in enumerate(groups) if g[0] == site[1]), None)
            if j is None:
                continue  # merged into its group's first member, or pruned
            out = _RENUMBER.sub(rf"\g<1>{j}\g<3>", name, count=1)
            members = [by_site[(site[0], m, site[2])] for m in groups[j]]
            makers[out] = partial(_read_mean, ckpt, members, planned[site[0]].weights[j])
            shapes.append((out, shape, dtype))
        elif block is not None and block in planned and shape[:1] == (planned[block].experts,):
            makers[name] = partial(_read_grouped, ckpt, name, planned[block])
            shapes.append((name, (len(planned[block].groups), *shape[1:]), dtype))
        else:
            makers[name] = partial(ckpt.get, name)
            shapes.append((name, shape, dtype))
    return shapes, lambda name: makers[name]()


def _read_mean(ckpt: Checkpoint, names: list[str], weights: list[float]) -> torch.Tensor:
    return _mean_of([ckpt.get(n) for n in names], weights)


def _read_grouped(ckpt: Checkpoint, name: str, block: SlimmedBlock) -> torch.Tensor:
    return _grouped(ckpt.get(name), block)


def _dtype(ckpt: Checkpoint, name: str) -> torch.dtype:
    return torch_dtype(ckpt.info(name).dtype, ckpt.path, name)


def slim_experts(
    ckpt: Checkpoint,
    planned: dict[str, SlimmedBlock],
    config: dict[str, int],
    writer: CheckpointWriter,
    out: str,
    options: SlimExpertsOptions,
    on_progress: Progress | None = None,
) -> SlimReport:
    """Write the slimmed model (`plan_slimming`'s plan) tensor by tensor into `writer`."""
    shapes, make = slimmed_tensors(ckpt, planned)
    for name, _, _ in shapes:
        writer.add(name, make(name))
        if on_progress:
            on_progress(1)
    return SlimReport(str(ckpt.path), out, options, list(planned.values()), config)
