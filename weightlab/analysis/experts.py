"""Mixture-of-Experts layers seen as sets of experts: how alike the experts are, which are near
copies, what the router holds, and (against a base) which experts a fine-tune moved.

Per MoE block (a layer's `mlp`), with E routed experts whose matrices are gate, up and down
(fused layouts are split by `io.experts`, Mixtral's w1/w3/w2 spelled the same by `naming`):

- **cosine** cos(e, f) = ⟨θ_e, θ_f⟩ / (‖θ_e‖‖θ_f‖), θ_e every weight of expert e in one vector
  (the task-vector cosine of Ilharco et al. 2023, taken between experts);
- **subspace overlap** of the top-k singular directions in the hidden space, mean over the parts:
  ‖A_eᵀA_f‖²_F / k, A the top-k right singular vectors of gate and up (the directions the expert
  reads) and the top-k left ones of down (the directions it writes); two random k-dimensional
  subspaces of the hidden size H overlap by k/H on average;
- **near copies**: groups of average-linkage clustering on 1 − cos cut at 1 − `near_copy`, from the
  weights alone (HC-SMoE, Chen et al. 2025, clusters experts by their outputs; this is the
  weight-only reading of it);
- **router rows** r_e (the gate's row of expert e): their norms and pairwise cosines;
- **moved** ‖θ'_e − θ_e‖ / ‖θ_e‖ against a base.

Memory: one part (gate, up or down) of one block's experts at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

from weightlab.analysis.compare import Square, clustering_order
from weightlab.compute.gram import top_singular
from weightlab.compute.similarity import cross_dots
from weightlab.display import fmt
from weightlab.errors import InvalidArgument
from weightlab.io.checkpoint import Checkpoint
from weightlab.io.experts import MoEBlock, moe_blocks
from weightlab.naming import canonical_name, layer_index
from weightlab.options import ExpertsOptions

if TYPE_CHECKING:
    from weightlab.compute.routing import Routing
from weightlab.results import Result, Table

Progress = Callable[..., None]
READS = {"gate_proj": "right", "up_proj": "right", "down_proj": "left"}  # the side that lives in the hidden space


@dataclass
class ExpertBlock:
    """One MoE block's experts (indices as the checkpoint numbers them)."""

    block: str  # canonical name of the block: layers.3.mlp
    layer: int | None
    experts: int
    parts: list[str]  # the matrices each expert has: gate_proj, up_proj, down_proj
    cosine: Square  # E×E
    subspace_overlap: Square  # E×E, mean over the parts
    random_overlap: float  # k/H: what two random subspaces would overlap by
    order: list[int]  # experts in clustering order (heatmap rows and columns)
    near_copies: list[list[int]]  # groups of two or more experts
    router: str | None = None  # the router's tensor name
    router_norms: list[float] | None = None  # ‖r_e‖
    router_cosine: Square | None = None
    moved: list[float | None] | None = None  # ‖θ'_e − θ_e‖ / ‖θ_e‖ against the base (None: θ_e = 0)
    router_moved: list[float | None] | None = None  # ‖r'_e − r_e‖ / ‖r_e‖
    shared: list[str] = field(default_factory=list)  # shared experts' tensors in the block (not routed)
    tokens: int | None = None  # with calibration text: the real tokens the block saw
    routed_share: list[float] | None = None  # share of the (token, slot) routings that went to each expert
    saliency: list[float | None] | None = None  # REAP's S_e (None: never routed to)

    def pairs(self) -> list[tuple[int, int]]:
        return [(i, j) for i in range(self.experts) for j in range(i + 1, self.experts)]

    def mean_cosine(self) -> float | None:
        return _mean([self.cosine[i][j] for i, j in self.pairs()])

    def most_similar(self) -> tuple[int, int, float] | None:
        known = [(v, i, j) for i, j in self.pairs() if (v := self.cosine[i][j]) is not None]
        if not known:
            return None
        value, i, j = max(known)
        return i, j, value

    def mean_overlap(self) -> float | None:
        return _mean([self.subspace_overlap[i][j] for i, j in self.pairs()])

    def nearest(self, e: int) -> tuple[int, float] | None:
        known = [(v, f) for f in range(self.experts) if f != e and (v := self.cosine[e][f]) is not None]
        if not known:
            return None
        value, f = max(known)
        return f, value


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


@dataclass
class ExpertsResult(Result):
    SCHEMA = "weightlab.experts/1"
    TITLE = "Experts: how alike, which are near copies, what the router holds, what moved"
    REFERENCE = "Chen et al. 2025 (HC-SMoE); Ilharco et al. 2023 (cosines of weight vectors)"
    ORDER = 27

    checkpoint: str
    base: str | None
    options: ExpertsOptions
    blocks: list[ExpertBlock]
    problems: list[str] = field(default_factory=list)
    calibration: str | None = None  # the text file the model ran on (routing, REAP)

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for b in self.blocks:
            group_of = {e: g for g, members in enumerate(b.near_copies) for e in members}
            for e in range(b.experts):
                nearest = b.nearest(e)
                out.append(
                    {
                        "block": b.block,
                        "layer": b.layer,
                        "expert": e,
                        "nearest": nearest[0] if nearest else None,
                        "cosine_to_nearest": nearest[1] if nearest else None,
                        "overlap_with_nearest": b.subspace_overlap[e][nearest[0]] if nearest else None,
                        "near_copy_group": group_of.get(e),
                        "router_norm": b.router_norms[e] if b.router_norms else None,
                        "moved": b.moved[e] if b.moved else None,
                        "router_moved": b.router_moved[e] if b.router_moved else None,
                        "routed_share": b.routed_share[e] if b.routed_share else None,
                        "reap_saliency": b.saliency[e] if b.saliency else None,
                    }
                )
        return out

    def tables(self) -> list[Table]:
        moved = self.base is not None
        routed = self.calibration is not None
        layers = Table(
            f"MoE blocks: experts compared (near copies: cosine ≥ {self.options.near_copy:g})",
            [
                "block",
                "experts",
                "mean cos",
                "most alike",
                f"top-{self.options.k} overlap",
                "random",
                "near copies",
                "router ‖r‖ min–max",
                *(["most moved", "least moved"] if moved else []),
                *(["most routed", "least routed", "lowest REAP"] if routed else []),
            ],
            [
                [
                    b.block,
                    b.experts,
                    b.mean_cosine(),
                    _pair(b.most_similar()),
                    b.mean_overlap(),
                    b.random_overlap,
                    "; ".join("{" + ", ".join(map(str, g)) + "}" for g in b.near_copies) or "none",
                    f"{fmt(min(b.router_norms))}–{fmt(max(b.router_norms))}" if b.router_norms else "-",
                    *(
                        [_extreme(b.moved, max), _extreme(b.moved, min)]
                        if moved and any(b.moved or [])
                        else ["none", "-"]
                        if moved
                        else []
                    ),
                    *(
                        [
                            _extreme(list[float | None](b.routed_share or []), max),
                            _extreme(list[float | None](b.routed_share or []), min),
                            _extreme(b.saliency, min),
                        ]
                        if routed
                        else []
                    ),
                ]
                for b in self.blocks
            ],
        )
        experts = Table(
            "Each expert: its nearest expert, its router row" + (", how far it moved" if moved else ""),
            [
                "block",
                "expert",
                "nearest",
                "cos",
                "overlap",
                "group",
                "‖r‖",
                *(["moved", "router moved"] if moved else []),
            ],
            [
                [
                    r["block"],
                    r["expert"],
                    r["nearest"],
                    r["cosine_to_nearest"],
                    r["overlap_with_nearest"],
                    r["near_copy_group"],
                    r["router_norm"],
                    *([r["moved"], r["router_moved"]] if moved else []),
                    *([r["routed_share"], r["reap_saliency"]] if routed else []),
                ]
                for r in sorted(
                    self.rows(),
                    key=lambda r: -(r["moved"] if moved and r["moved"] is not None else r["cosine_to_nearest"] or 0),
                )
            ],
        )
        return [layers, experts]

    def headline(self) -> list[tuple[str, str, object]]:
        if not self.blocks:
            return [("blocks", "MoE blocks", 0)]
        alike = [(found, b) for b in self.blocks if (found := b.most_similar()) is not None]
        out: list[tuple[str, str, object]] = [
            ("blocks", "MoE blocks", len(self.blocks)),
            ("experts", "experts per block", _spread([b.experts for b in self.blocks])),
            ("near_copies", "near-copy groups", sum(len(b.near_copies) for b in self.blocks)),
        ]
        if alike:
            (i, j, value), b = max(alike, key=lambda x: x[0][2])
            out.append(("most_alike", "most alike experts (cosine)", f"{b.block} {i}–{j} ({fmt(value)})"))
        if self.calibration is not None:
            shares = [(s, e, b) for b in self.blocks if b.routed_share for e, s in enumerate(b.routed_share)]
            if shares:
                s, e, b = min(shares, key=lambda x: x[0])
                out.append(("least_routed", "least routed expert (share)", f"{b.block} {e} ({fmt(s)})"))
                never = sum(1 for b in self.blocks for v in b.saliency or [] if v is None)
                out.append(("never_routed", "experts no token reached", never))
        if self.base is not None:
            moved = [(m, e, b) for b in self.blocks if b.moved for e, m in enumerate(b.moved) if m is not None]
            if moved:
                m, e, b = max(moved, key=lambda x: x[0])
                out.append(("most_moved", "most moved expert", f"{b.block} {e} ({fmt(m)})"))
        return out

    def lines(self) -> list[str]:
        groups = [f"{b.block}: " + "; ".join(str(g) for g in b.near_copies) for b in self.blocks if b.near_copies]
        head = f"near copies (cosine ≥ {self.options.near_copy:g}): "
        return [head + (" | ".join(groups) if groups else "none")] if self.blocks else ["no Mixture-of-Experts block"]

    def note(self) -> str:
        return (
            f"{self.checkpoint}" + (f" against {self.base}" if self.base else "") + ". Cosines are between whole "
            "experts (gate, up and down in one vector); the overlap is of the top singular directions in the "
            "hidden space, beside what random subspaces would give."
        )


def _pair(found: tuple[int, int, float] | None) -> str:
    return f"{found[0]}–{found[1]} ({fmt(found[2])})" if found else "-"


def _extreme(values: list[float | None] | None, pick: Callable[..., tuple[float, int]]) -> str:
    known = [(v, e) for e, v in enumerate(values or []) if v is not None]
    if not known:
        return "-"
    value, e = pick(known)
    return f"{e} ({fmt(value)})"


def _spread(values: list[int]) -> str:
    return str(values[0]) if min(values) == max(values) else f"{min(values)}–{max(values)}"


def _hidden_basis(w: torch.Tensor, part: str, k: int) -> torch.Tensor:
    """The top-k singular directions of one expert matrix on its hidden-space side (orthonormal columns)."""
    side = READS.get(part, "right" if w.shape[1] <= w.shape[0] else "left")
    _, svd = top_singular(w.double(), min(k, *w.shape))
    return svd.Vh.mT if side == "right" else svd.U


def _square(matrix: np.ndarray, known: np.ndarray | None = None) -> Square:
    n = matrix.shape[0]
    return [[float(matrix[i, j]) if known is None or known[i, j] else None for j in range(n)] for i in range(n)]


def near_copy_groups(cosine: Square, threshold: float) -> list[list[int]]:
    """Groups (two or more) of average-linkage clustering on 1 − cos, cut at 1 − threshold: experts
    whose mean cosine to each other is at least `threshold`."""
    n = len(cosine)
    if n < 2:
        return []
    distance = np.array([[0.0 if i == j else 1.0 - (cosine[i][j] or 0.0) for j in range(n)] for i in range(n)])
    distance = np.clip((distance + distance.T) / 2, 0, 2)
    labels = fcluster(linkage(squareform(distance, checks=False), "average"), t=1.0 - threshold, criterion="distance")
    groups: dict[int, list[int]] = {}
    for e, label in enumerate(labels):
        groups.setdefault(int(label), []).append(e)
    return sorted((g for g in groups.values() if len(g) > 1), key=lambda g: g[0])


def experts(
    ckpt: Checkpoint,
    base: Checkpoint | None = None,
    options: ExpertsOptions = ExpertsOptions(),
    device: torch.device | str = "cpu",
    on_progress: Progress | None = None,
    on_start: Progress | None = None,
    routes: dict[str, Routing] | None = None,
    calibration: str | None = None,
) -> ExpertsResult:
    """Compare the experts of every MoE block of `ckpt` (and, with `base`, how far each moved;
    with `routes`, `analysis.routing` on the text file `calibration`, how often each is routed to
    and its REAP saliency)."""
    sites = moe_blocks(ckpt, options.include, options.exclude)
    if not sites:
        raise InvalidArgument(
            "no Mixture-of-Experts block: no tensor is named as a routed expert's "
            "(mlp.experts.N.…, block_sparse_moe.experts.N.…, or transformers' fused experts.gate_up_proj)",
            ckpt.path,
        )
    if on_start:
        on_start(len(sites))
    base_names = {canonical_name(n): n for n in base.names()} if base is not None else {}
    blocks = []
    for block, site in sites.items():
        found = _block(ckpt, base, base_names, block, site, options, torch.device(device))
        route = (routes or {}).get(block)
        if route is not None and len(route.routed) == found.experts:
            found.tokens, found.routed_share, found.saliency = route.tokens, route.share, route.saliency
        blocks.append(found)
        if on_progress:
            on_progress(1)
    return ExpertsResult(
        str(ckpt.path), str(base.path) if base is not None else None, options, blocks, calibration=calibration
    )


def _block(
    ckpt: Checkpoint,
    base: Checkpoint | None,
    base_names: dict[str, str],
    block: str,
    site: MoEBlock,
    options: ExpertsOptions,
    device: torch.device,
) -> ExpertBlock:
    n = len(next(iter(site.parts.values())))
    dots = np.zeros((n, n))
    overlap = np.zeros((n, n))
    moved_sq, base_sq = np.zeros(n), np.zeros(n)
    hidden = 0
    parts = sorted(site.parts, key=lambda p: (list(READS).index(p) if p in READS else len(READS), p))
    for part in parts:
        names = [site.parts[part][e] for e in range(n)]
        weights = [ckpt.get(name, device=device) for name in names]  # as stored (bfloat16: half of float32)
        dots += cross_dots(weights)
        bases = torch.stack([_hidden_basis(w, part, options.k) for w in weights])  # E × H × k (one shape)
        hidden = bases.shape[1]
        overlap += (torch.einsum("ehk,fhl->efkl", bases, bases).square().sum((2, 3)) / bases.shape[2]).cpu().numpy()
        if base is not None:
            for e, (name, w) in enumerate(zip(names, weights)):
                w0 = _base_tensor(base, base_names, name, tuple(w.shape)).to(device)
                moved_sq[e] += float((w.double() - w0).square().sum())
                base_sq[e] += float(w0.square().sum())
        del weights
    norm = np.sqrt(np.diag(dots))
    known = np.outer(norm, norm) > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = _square(np.where(known, dots / np.where(known, np.outer(norm, norm), 1.0), 0.0), known)
    k_eff = min(options.k, hidden) if hidden else options.k
    result = ExpertBlock(
        block=block,
        layer=layer_index(block + "."),
        experts=n,
        parts=parts,
        cosine=cosine,
        subspace_overlap=_square(overlap / len(parts)),
        random_overlap=k_eff / hidden if hidden else math.nan,
        order=clustering_order(cosine),
        near_copies=near_copy_groups(cosine, options.near_copy),
        shared=sorted(site.shared),
    )
    if base is not None:
        result.moved = [float(math.sqrt(m / b)) if b > 0 else None for m, b in zip(moved_sq, base_sq)]
    if site.router is not None:
        rows = ckpt.get(site.router).double()  # E × H: small, on the CPU
        if rows.ndim == 2 and rows.shape[0] == n:
            result.router = site.router
            norms = rows.norm(dim=1)
            result.router_norms = [float(v) for v in norms]
            unit = rows / norms.clamp_min(torch.finfo(torch.float64).tiny)[:, None]
            result.router_cosine = _square((unit @ unit.T).numpy(), np.outer(norms > 0, norms > 0))
            if base is not None:
                rows0 = _base_tensor(base, base_names, site.router, tuple(rows.shape))
                result.router_moved = [
                    float((rows[e] - rows0[e]).norm() / rows0[e].norm()) if float(rows0[e].norm()) > 0 else None
                    for e in range(n)
                ]
    return result


def _base_tensor(base: Checkpoint, base_names: dict[str, str], name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The base's tensor of the same canonical name and shape, refused by name when it has none."""
    held = base_names.get(canonical_name(name))
    if held is None:
        raise InvalidArgument(f"the base has no {canonical_name(name)}: it is not this MoE's base", base.path, name)
    w0 = base.get(held).double()
    if tuple(w0.shape) != shape:
        raise InvalidArgument(
            f"the base's {held} is {list(w0.shape)}, the model's {list(shape)}: not this MoE's base", base.path, name
        )
    return w0
