"""LoRA from weights: initialisation (LoRA-Init from TSDs, PiSSA, MiLoRA), extraction, and the
conversion of a trained PiSSA-style adapter into a plain one.

Initialisation splits each targeted base weight W = UΣVᵀ along a set S of r singular triplets:
with s the LoRA scale (lora_alpha/r),

    B = U_S·diag(√(σ_S/s)),  A = diag(√(σ_S/s))·V_Sᵀ,  residual W_res = W − s·B·A = W − U_S Σ_S V_Sᵀ,

so residual + s·B·A = W and the model is unchanged at initialisation. S is
- `pissa`: the top r (Meng et al. 2024, "PiSSA", eq. 2-4; PEFT's `init_lora_weights="pissa"`);
- `milora`: the bottom r (Wang et al. 2024, "MiLoRA", §3);
- `tsd`: the r directions with the largest change rate δ_i = |u_iᵀΔWv_i|/σ_i under a warm-up
  update ΔW (Si et al. 2024, "Task-Specific Directions", LoRA-Init, §5).

Extraction approximates ΔW = W_ft − W_base by its truncated SVD, B = U_r√Σ_r, A = √Σ_rV_rᵀ, with
lora_alpha = r (scale 1): the best rank-r approximation (Eckart & Young 1936).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch

from weightlab.compute.deltas import adapter_factors, delta_singular_values, numerical_rank
from weightlab.compute.device import Compute
from weightlab.compute.directions import core_directions, delta_times_v
from weightlab.compute.gram import singular_values
from weightlab.compute.svd import SVD, full_svd, lowrank_svd, randomized_svd
from weightlab.compute.walk import Batch, Selection, TensorWalk
from weightlab.domains import Int, Real
from weightlab.errors import InvalidArgument, MissingTensor, ShapeMismatch
from weightlab.io.adapter import LoraAdapter
from weightlab.io.adapter_writer import LoraFactors, NewAdapter
from weightlab.io.checkpoint import Checkpoint
from weightlab.io.safetensors_file import torch_dtype
from weightlab.io.writer import CheckpointWriter
from weightlab.naming import from_matrix, layer_index, matrix_shape, module_role
from weightlab.options import LoraInitOptions, RankBudget
from weightlab.results import Result, Table
from weightlab.surgery.rank_budget import allocate_ranks
from weightlab.surgery.targets import fan_in_fan_out


@dataclass
class ModuleReport:
    name: str
    shape: list[int]
    rank: int
    indices: list[int]  # singular directions used (positions in the base spectrum; None for extraction)
    energy: float  # Σ_S σ_i² / Σ σ_i²: the share of ‖W‖²_F (init) or ‖ΔW‖²_F (extract) in the adapter
    relative_error: float  # init: ‖W − s·BA‖_F/‖W‖_F; extract: ‖ΔW − BA‖_F/‖ΔW‖_F


@dataclass
class LoraReport(Result):
    """What init-lora or extract-lora made: per module its rank, the directions used, the energy
    share they hold and the relative error left; also the adapter's sidecar `weightlab_lora.json`."""

    ORDER = 70
    KIND: ClassVar[str]  # "init" or "extract"

    options: dict
    base: str
    source: str | None
    modules: list[ModuleReport] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"schema": self.SCHEMA, "kind": self.KIND, **asdict(self)}

    def rows(self) -> list[dict]:
        return [
            {**asdict(m), "shape": "×".join(map(str, m.shape)), "indices": " ".join(map(str, m.indices))}
            for m in self.modules
        ]

    def tables(self) -> list[Table]:
        init = self.KIND == "init"
        share, error = ("‖W‖²", "‖W − sBA‖/‖W‖ (residual)") if init else ("‖ΔW‖²", "relative error")
        return [
            Table(
                f"{len(self.modules)} modules",
                ["module", "layer", "shape", "rank", "directions", f"share of {share}", error],
                [
                    [
                        m.name,
                        layer_index(m.name),
                        f"{m.shape[0]}×{m.shape[1]}",
                        m.rank,
                        ", ".join(map(str, m.indices[:6])) + (" …" if len(m.indices) > 6 else ""),
                        m.energy,
                        m.relative_error,
                    ]
                    for m in self.modules
                ],
                numeric_from=3,
                names=True,
            )
        ]

    def headline(self) -> list[tuple[str, str, Any]]:
        """For extraction, how far the adapter is from ΔW at worst; for initialisation (where adapter
        plus residual is W exactly), how much of ‖W‖² the adapter took on average."""
        shares, errors = [m.energy for m in self.modules], [m.relative_error for m in self.modules]
        last = (
            ("max_error", "largest relative error", max(errors) if errors else None)
            if self.KIND == "extract"
            else ("mean_share", "mean share of ‖W‖² in the adapter", sum(shares) / len(shares) if shares else None)
        )
        return [
            ("modules", "modules adapted", len(self.modules)),
            ("rank", "total rank", sum(m.rank for m in self.modules)),
            last,
        ]

    def lines(self) -> list[str]:
        if not self.skipped:
            return []
        return [f"{len(self.skipped)} targeted weights are unchanged in the fine-tune and were skipped"]


@dataclass
class LoraInitReport(LoraReport):
    SCHEMA = "weightlab.lora-init/1"
    TITLE = "LoRA initialised from the base's singular directions"
    REFERENCE = "Meng et al. 2024 (PiSSA); Wang et al. 2024 (MiLoRA); Si et al. 2024 (LoRA-Init from TSDs)"
    KIND = "init"


@dataclass
class LoraExtractReport(LoraReport):
    SCHEMA = "weightlab.lora-extract/1"
    TITLE = "LoRA extracted from a fine-tune"
    REFERENCE = "Eckart & Young 1936 (best rank-r approximation of ΔW)"
    KIND = "extract"


def _check_rank(name: str, rank: int, shape: tuple[int, ...], path) -> None:
    if rank > min(shape):
        raise InvalidArgument(
            f"rank {rank} exceeds min(m, n) = {min(shape)} of this {shape[0]}×{shape[1]} weight", path, name
        )


def _split(w: torch.Tensor, svd: SVD, chosen: torch.Tensor, scale: float) -> tuple[LoraFactors, torch.Tensor]:
    """B, A on the chosen triplets and the residual W − U_S Σ_S V_Sᵀ."""
    u, s, vh = svd.U[:, chosen], svd.S[chosen], svd.Vh[chosen]
    root = torch.sqrt(s / scale)
    factors = LoraFactors(a=root[:, None] * vh, b=u * root[None, :])
    residual = w - (u * s) @ vh
    return factors, residual


def _embedding(name: str) -> bool:
    return module_role(name) in ("embed", "pos_embed")


def _check_same_weights(base: Checkpoint, finetuned: Checkpoint, targets: list[str]) -> None:
    """Every target is in the fine-tune too, with the base's shape."""
    for name in targets:
        if name not in finetuned:
            raise MissingTensor(
                "the base has this weight but the fine-tune does not; is it of another model?", finetuned.path, name
            )
        if tuple(finetuned.info(name).shape) != tuple(base.info(name).shape):
            raise ShapeMismatch(
                f"{list(finetuned.info(name).shape)} in the fine-tune but {list(base.info(name).shape)} "
                "in the base; is it of another model?",
                finetuned.path,
                name,
            )


def _targets_walk(base: Checkpoint, targets: list[str], finetuned: Checkpoint | None = None) -> TensorWalk:
    return TensorWalk(
        [base] if finetuned is None else [base, finetuned], Selection(matrices=False, names=frozenset(targets))
    )


def budget_ranks(
    base: Checkpoint,
    targets: list[str],
    budget: RankBudget,
    finetuned: Checkpoint | None = None,
    compute: Compute | None = None,
) -> dict[str, int]:
    """Each target's rank under `budget`, from the singular values of ΔW = finetuned − base (of W
    itself without a fine-tune), capped by the numerical rank."""
    compute = compute or Compute.create()
    walk = _targets_walk(base, targets, finetuned)

    def work(batch: Batch, compute: Compute) -> list[tuple[str, torch.Tensor]]:
        w = batch.tensors[0]
        s = (
            singular_values(w)
            if finetuned is None
            else delta_singular_values(finetuned, batch.items, w, batch.tensors[1], compute)
        )  # from factors for adapters
        return [(item.names[0], s[b].cpu()) for b, item in enumerate(batch.items)]

    # a weight the fine-tune leaves alone (ΔW = 0) gets no rank
    spectra = {name: s for name, s in walk.map(work, compute) if float(s[0]) > 0}
    if not spectra:
        raise InvalidArgument(
            "no targeted weight differs between the base and the fine-tune",
            finetuned.path if finetuned is not None else base.path,
        )
    caps = {
        name: numerical_rank(s, matrix_shape(name, base.info(name).shape, base.config)) or 1
        for name, s in spectra.items()
    }
    return allocate_ranks(spectra, budget.total, budget.rule, caps)


def _chosen_directions(
    w: torch.Tensor,
    name: str,
    options: LoraInitOptions,
    rank: int,
    finetuned: Checkpoint | None,
    w_ft: torch.Tensor | None,
    compute: Compute,
) -> tuple[SVD, torch.Tensor]:
    """The SVD of W (top-r only when randomized) and the `rank` triplets the method uses."""
    if options.svd == "randomized":
        return randomized_svd(w, rank, seed=options.seed), torch.arange(rank, device=w.device)
    svd = full_svd(w)
    r_all = svd.S.numel()
    if options.method == "pissa":
        return svd, torch.arange(rank, device=w.device)
    if options.method == "milora":
        return svd, torch.arange(r_all - rank, r_all, device=w.device)
    delta_v, delta_norm2 = delta_times_v(finetuned, name, w, w_ft, svd.Vh, compute)
    return svd, core_directions(svd.U, svd.S, delta_v, delta_norm2, rank)[1]


def init_lora(
    base: Checkpoint,
    targets: list[str],
    options: LoraInitOptions,
    finetuned: Checkpoint | None = None,
    residual: CheckpointWriter | None = None,
    compute: Compute | None = None,
    on_progress: Callable[[int], None] | None = None,
    budget: RankBudget | None = None,
    base_model: str | None = None,
) -> tuple[LoraInitReport, NewAdapter]:
    """The adapter of every targeted weight's factors; with `residual` (a writer planned with
    `stored_plan(base)`), the whole base is written into it with the targeted weights replaced by
    their residuals (in the base's dtype). With `budget`, ranks are shared by the spectra of W (of
    ΔW for tsd) and the scale is 1 (lora_alpha = each module's rank). `base_model` is what the
    adapter names as its base (default: the base's path; give the residual's when there is one)."""
    compute = compute or Compute.create()
    fan = fan_in_fan_out(base, targets)
    if options.method == "tsd" and finetuned is None:
        raise InvalidArgument("--method tsd needs --from FT (a fine-tuned checkpoint or a warm-up adapter)")
    if budget is not None and options.alpha is not None:
        raise InvalidArgument("--alpha with --rank-budget: each module's lora_alpha is its own rank (scale 1)")
    warmup = finetuned if options.method == "tsd" else None
    if warmup is not None:
        _check_same_weights(base, warmup, targets)
    ranks = (
        budget_ranks(base, targets, budget, warmup, compute)
        if budget is not None
        else dict.fromkeys(targets, options.rank)
    )
    for name in targets:
        _check_rank(name, ranks[name], matrix_shape(name, base.info(name).shape, base.config), base.path)
    scale = 1.0 if budget is not None else options.scale
    report = LoraInitReport(
        {**asdict(options), **({"rank_budget": asdict(budget), "rank": None} if budget else {})},
        str(base.path),
        None if finetuned is None else str(finetuned.path),
    )
    factors: dict[str, LoraFactors] = {}
    wanted = set(targets)
    if residual is not None:
        for name in base.names():
            if name not in wanted:
                residual.add(name, base.get(name))
    walk = _targets_walk(base, targets, warmup)
    # on a Ray cluster the workers write the residuals into the staged shards themselves
    sink = (
        residual.sink([i.names[0] for i in walk.items], compute.cluster is not None) if residual is not None else None
    )

    def work(batch: Batch, compute: Compute) -> list[tuple[str, LoraFactors, ModuleReport]]:
        out = []
        for b, item in enumerate(batch.items):
            name = item.names[0]
            w = batch.tensors[0][b]
            w_ft = batch.tensors[1][b] if warmup is not None and batch.tensors[1] is not None else None
            svd, chosen = _chosen_directions(w, name, options, ranks[name], warmup, w_ft, compute)
            f, res = _split(w, svd, chosen, scale)
            f.embedding = _embedding(name)
            total = float((w * w).sum()) or 1.0
            kept = float((svd.S[chosen] ** 2).sum())
            out.append(
                (
                    name,
                    f,
                    ModuleReport(
                        name,
                        list(w.shape),
                        ranks[name],
                        chosen.tolist(),
                        kept / total,
                        math.sqrt(float((res * res).sum()) / total),
                    ),
                )
            )
            if sink is not None:
                stored = base.info(name)
                stored_res = from_matrix(name, res, stored.shape, base.config)
                sink(name, stored_res.to(torch_dtype(stored.dtype, base.path, name)).cpu())
        return out

    pieces = walk.map(work, compute, factors=True, on_progress=on_progress)
    if residual is not None and compute.cluster is not None:
        residual.written_elsewhere([name for name, _, _ in pieces])
    for name, f, module in pieces:
        factors[name.removesuffix(".weight")] = f
        report.modules.append(module)
    report.modules = walk.in_order(report.modules, lambda m: m.name)
    return report, _adapter(report, factors, scale, base_model or str(base.path), fan)


def _adapter(
    report: LoraReport, factors: dict[str, LoraFactors], scale: float, base_model: str, fan: bool
) -> NewAdapter:
    """The adapter of `factors`, its modules in the report's order."""
    ordered = {m.name.removesuffix(".weight"): factors[m.name.removesuffix(".weight")] for m in report.modules}
    return NewAdapter(ordered, scale, base_model, fan)


def extract_lora(
    base: Checkpoint,
    finetuned: Checkpoint,
    targets: list[str],
    rank: int | None = None,
    energy: float | None = None,
    compute: Compute | None = None,
    on_progress: Callable[[int], None] | None = None,
    budget: RankBudget | None = None,
    base_model: str | None = None,
) -> tuple[LoraExtractReport, NewAdapter]:
    """The adapter (scale 1) of ΔW's truncated SVD for every targeted weight, of one rank, of the
    rank that keeps an `energy` share, or of the ranks a `budget` gives each module from the
    spectra of ΔW. `base_model` is what the adapter names as its base (default: the base's path)."""
    compute = compute or Compute.create()
    fan = fan_in_fan_out(base, targets)
    if sum(x is not None for x in (rank, energy, budget)) != 1:
        raise InvalidArgument("give exactly one of --rank, --energy and --rank-budget")
    Int(1, optional=True).check("--rank", rank)
    Real(0, 1, low_open=True, optional=True).check("--energy", energy)
    if rank is not None:
        for name in targets:
            _check_rank(name, rank, matrix_shape(name, base.info(name).shape, base.config), base.path)
    _check_same_weights(base, finetuned, targets)
    ranks = budget_ranks(base, targets, budget, finetuned, compute) if budget is not None else None
    report = LoraExtractReport(
        {"rank": rank, "energy": energy, "rank_budget": asdict(budget) if budget else None},
        str(base.path),
        str(finetuned.path),
    )
    factors: dict[str, LoraFactors] = {}
    walk = _targets_walk(base, targets, finetuned)

    def work(batch: Batch, compute: Compute) -> list[tuple[str, LoraFactors | None, ModuleReport | None]]:
        """Per weight its factors and report, or (name, None, None) when ΔW is zero there."""
        out = []
        for b, item in enumerate(batch.items):
            name = item.names[0]
            lowrank = adapter_factors(finetuned, name, compute)
            if lowrank is not None:
                svd = lowrank_svd(*lowrank)
            elif batch.tensors[1] is None:  # an adapter that leaves this weight as the base has it
                out.append((name, None, None))
                continue
            else:
                svd = full_svd(batch.tensors[1][b] - batch.tensors[0][b])
            s2 = svd.S.double() ** 2
            total = float(s2.sum())
            if total == 0:
                out.append((name, None, None))
                continue
            r = (
                ranks[name]
                if ranks is not None
                else rank
                if rank is not None
                else int((s2.cumsum(0) >= energy * total * (1 - 1e-12)).int().argmax()) + 1
            )
            r = min(r, svd.S.numel())
            root = svd.S[:r].sqrt()
            kept = float(s2[:r].sum())
            out.append(
                (
                    name,
                    LoraFactors(
                        a=root[:, None] * svd.Vh[:r], b=svd.U[:, :r] * root[None, :], embedding=_embedding(name)
                    ),
                    ModuleReport(
                        name,
                        [svd.U.shape[0], svd.Vh.shape[1]],
                        r,
                        list(range(r)),
                        kept / total,
                        math.sqrt(max(total - kept, 0.0) / total),
                    ),
                )
            )
        return out

    for name, f, module in walk.map(work, compute, factors=True, on_progress=on_progress):
        if f is None:
            report.skipped.append(name)
        else:
            factors[name.removesuffix(".weight")] = f
            report.modules.append(module)
    if not factors:
        raise InvalidArgument("no targeted weight differs between the base and the fine-tune", finetuned.path)
    report.modules = walk.in_order(report.modules, lambda m: m.name)
    report.skipped = walk.in_order(report.skipped, str)
    return report, _adapter(report, factors, 1.0, base_model or str(base.path), fan)


def to_plain_lora(trained: LoraAdapter, initial: LoraAdapter) -> NewAdapter:
    """A trained adapter that started from `initial` on a residual base, as a plain LoRA for the
    unmodified base: A' = [A; A₀], B' = [B, −B₀] (rank 2r, same scale), so that
    s·B'A' = s(BA − B₀A₀) — the conversion PEFT documents for PiSSA. A LoRA bias becomes b − b₀;
    the trained adapter's saved modules come along as they are (the residual base leaves every
    untargeted tensor as the base has it)."""
    if set(trained.modules) != set(initial.modules):
        raise InvalidArgument("the trained adapter and the initial one adapt different modules", trained.path)
    out, scales = {}, set()
    for module, m in trained.modules.items():
        m0 = initial.modules[module]
        if (m.rank, m.scale, m.embedding) != (m0.rank, m0.scale, m0.embedding):
            raise InvalidArgument("rank or scale differs from the initial adapter's", trained.path, module)
        left, right, _ = trained.matrix_factors(module)
        left0, right0, _ = initial.matrix_factors(module)
        biases = [
            a.bias_delta(module) / m.scale if a.modules[module].bias is not None else None for a in (trained, initial)
        ]
        bias = (
            None
            if biases == [None, None]
            else (biases[0] if biases[0] is not None else 0) - (biases[1] if biases[1] is not None else 0)
        )
        out[module] = LoraFactors(
            a=torch.cat([right, right0]), b=torch.cat([left, -left0], 1), embedding=m.embedding, bias=bias
        )
        scales.add(m.scale)
    if len(scales) != 1:
        raise InvalidArgument("modules have different scales; cannot write one plain adapter", trained.path)
    return NewAdapter(
        out,
        scales.pop(),
        trained.base_model_name_or_path,
        bool(trained.adapter_config.get("fan_in_fan_out")),
        {name: trained.read_saved(name) for name in trained.saved},
    )
