"""`weightlab spectrum`: how fine-tuning moved each weight matrix's spectrum and singular vectors.

With W = UΣVᵀ the base matrix and W' = U'Σ'V'ᵀ the fine-tuned one (ΔW = W' − W):
- amplification a_i = σ'_i/σ_i (i ≤ k), and the share of Σ_i|σ'_i − σ_i| held by the top k
  (Si et al. 2025, "Weight Spectra Induced Efficient Model Adaptation": fine-tuning mostly
  amplifies the top singular values);
- norms: spectral ‖·‖₂ = σ₁, Frobenius ‖·‖_F = (Σσ_i²)^½, stable rank ‖·‖_F²/‖·‖₂², effective
  rank exp(H(p)) with p_i = σ_i/Σσ_j (Roy & Vetterli 2007, eq. 1);
- energy ranks of ΔW: the smallest r with Σ_{i≤r} s_i² ≥ 0.9 (0.99) Σ s_i²;
- reorientation |⟨u'_i, u_i⟩|, |⟨v'_i, v_i⟩| (i ≤ k) and the best match max_j |⟨u'_i, u_j⟩|;
- intruder dimensions (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of
  Equivalence", §3): u'_i among the top k_int of W' with max_j |cos(u'_i, u_j)| < ε;
- subspace similarity φ = ‖U_kᵀU'_k‖_F²/k (1 = same top-k subspace, Hu et al. 2021, §7.2).

Route (`compute.gram`): every singular value from the eigenvalues of the smaller Gram matrix in
float64; the fine-tune's top singular vectors from the same tridiagonal reduction;
only the base is fully decomposed (Gram eigenvectors), once per matrix, and kept in a persistent
cache keyed by its content (`compute.cache`). `values_only` skips every vector; with no
fine-tune it gives the base's own spectra (norms, ranks, singular values).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from weightlab.analysis.summary import group_summary, mean
from weightlab.compute.cache import DecompositionCache, tensor_digest
from weightlab.compute.deltas import update_singular_values
from weightlab.compute.device import Compute
from weightlab.compute.gram import ROW_BLOCK, GramSpectrum, triplets
from weightlab.compute.spectra import base_vectors, decomposition, top_columns
from weightlab.compute.walk import Batch, Selection, TensorWalk, may_change
from weightlab.display import described, model_names
from weightlab.errors import InvalidArgument
from weightlab.io.checkpoint import Checkpoint
from weightlab.matching import MatchedTensor
from weightlab.options import SpectrumOptions
from weightlab.results import Result, Table


@dataclass
class Norms:
    spectral: float
    frobenius: float
    stable_rank: float
    effective_rank: float


@dataclass
class MagnitudeDirection:
    """How much W grew and how far it turned: the whole matrix as one vector (MAP, Si et al. 2025,
    "Revisiting Weight Decomposition for Low-Rank Adaptation", §3) and per output row, the
    magnitude vector m_j = ‖W_j,:‖ of DoRA (Liu et al. 2024, §4.1, eq. 2 and the ΔM, ΔD of eq. 5;
    PEFT's `weight_norm` over dim 1 of the out×in weight)."""

    norm_ratio: float  # ‖W'‖_F / ‖W‖_F
    angle_deg: float  # ∠(vec W, vec W') in degrees
    magnitude_change: float  # mean_j |m'_j − m_j| / m_j
    magnitude_change_max: float  # max_j of the same
    dora_delta_m: float  # ΔM = mean_j |m'_j − m_j|
    dora_delta_d: float  # ΔD = mean_j (1 − cos(W_j, W'_j))


def half_versine(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """(1 − cos θ)/2 = sin²(θ/2) = (d² − (a − b)²) / 4ab for vectors of norms a, b whose difference
    has norm d (the law of cosines in half-angle form), elementwise in float64: exact for the tiny
    angles of fine-tuning, where 1 − ⟨x, y⟩/(‖x‖‖y‖) would cancel. 1/2 (cos 0) where a or b is 0."""
    a, b, d = (torch.as_tensor(x, dtype=torch.float64) for x in (a, b, d))
    gap = (a - b).abs()
    inner = ((d - gap) * (d + gap)).clamp_min(0) / (4 * a * b)
    return torch.where((a > 0) & (b > 0), inner.clamp(0, 1), torch.full_like(inner, 0.5))


def vector_angle(a: float, b: float, d: float) -> float:
    """∠ between two vectors of norms a, b whose difference has norm d, in degrees:
    θ = 2·asin(√`half_versine`)."""
    if a == 0 or b == 0:
        return float("nan")
    return math.degrees(2 * math.asin(math.sqrt(float(half_versine(a, b, d)))))


def _row_norms(*matrices: torch.Tensor) -> list[torch.Tensor]:
    """The float64 norm of every row of each matrix, a block of rows at a time (no float64 copy
    of a whole embedding)."""
    return [
        torch.cat(
            [torch.linalg.vector_norm(x[i : i + ROW_BLOCK].double(), dim=1) for i in range(0, x.shape[0], ROW_BLOCK)]
        )
        for x in matrices
    ]


def magnitude_direction(
    w: torch.Tensor, w_ft: torch.Tensor, base: Norms, ft: Norms, delta: Norms
) -> MagnitudeDirection:
    """`MagnitudeDirection` of one matrix (out×in) from the norms of its rows, of the fine-tune's
    and of the update's (1 − cos per row by `half_versine`), and the three Frobenius norms."""
    m, m_ft, d = _row_norms(w, w_ft, w_ft - w)
    relative = (m_ft - m).abs() / m.clamp_min(torch.finfo(torch.float64).tiny)
    ratio = ft.frobenius / base.frobenius if base.frobenius > 0 else float("inf")
    return MagnitudeDirection(
        ratio,
        vector_angle(base.frobenius, ft.frobenius, delta.frobenius),
        float(relative.mean()),
        float(relative.max()),
        float((m_ft - m).abs().mean()),
        float((2 * half_versine(m, m_ft, d)).mean()),
    )


@dataclass
class MatrixSpectrum:
    """One matrix against one fine-tune. Without a fine-tune (`--values-only` on one checkpoint)
    only the base fields are set; with `values_only` the vector fields stay empty."""

    name: str
    finetuned: int | None  # index into SpectrumResult.finetuned
    layer: int | None
    role: str
    shape: list[int]
    base: Norms
    ft: Norms | None
    delta: Norms | None
    relative_change: float | None  # ‖ΔW‖_F / ‖W‖_F
    delta_rank90: int | None
    delta_rank99: int | None
    amplification: list[float]  # σ'_i/σ_i, i < k
    topk_change_share: float | None  # Σ_{i<k}|σ'_i−σ_i| / Σ_i|σ'_i−σ_i|
    u_alignment: list[float]  # |⟨u'_i, u_i⟩|, i < k
    v_alignment: list[float]
    best_match_index: list[int]  # argmax_j |⟨u'_i, u_j⟩|, i < intruder_k
    best_match_cos: list[float]
    intruders: list[int]  # i < intruder_k with best_match_cos < ε
    subspace_similarity: float | None
    sv_base: list[float]
    sv_ft: list[float]
    direction: MagnitudeDirection | None = None  # with a fine-tune

    @property
    def mean_amplification(self) -> float | None:
        return sum(self.amplification) / len(self.amplification) if self.amplification else None

    @property
    def mean_u_alignment(self) -> float | None:
        return sum(self.u_alignment) / len(self.u_alignment) if self.u_alignment else None

    def row(self) -> dict:
        """Flat scalar columns for CSV and tables."""
        return {
            "name": self.name,
            "finetuned": self.finetuned,
            "layer": self.layer,
            "role": self.role,
            "rows": self.shape[0],
            "cols": self.shape[1],
            "relative_change": self.relative_change,
            "amplification_1": first(self.amplification),
            "mean_amplification_k": self.mean_amplification,
            "topk_change_share": self.topk_change_share,
            "delta_rank90": self.delta_rank90,
            "delta_rank99": self.delta_rank99,
            "u1_alignment": first(self.u_alignment),
            "mean_u_alignment_k": self.mean_u_alignment,
            "subspace_similarity": self.subspace_similarity,
            "intruders": len(self.intruders) if self.best_match_cos else None,
            **({f"direction_{k}": v for k, v in asdict(self.direction).items()} if self.direction else {}),
            **{
                f"{part}_{k}": v
                for part in ("base", "ft", "delta")
                for k, v in asdict(getattr(self, part) or Norms(*[None] * 4)).items()
            },
        }


@dataclass
class SpectrumResult(Result):
    SCHEMA = "weightlab.spectrum/1"
    TITLE = "Spectrum: what fine-tuning did to each matrix"
    REFERENCE = "Si et al. 2025 (spectra); Shuttleworth et al. 2024 (intruder dimensions)"
    ORDER = 10

    base: str
    finetuned: list[str]
    options: SpectrumOptions
    matrices: list[MatrixSpectrum]
    num_layers: int | None = None
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "schema": self.SCHEMA,
            "base": self.base,
            "finetuned": self.finetuned,
            "options": asdict(self.options),
            "num_layers": self.num_layers,
            "problems": self.problems,
            "summary_by_layer": summarise(self.matrices, "layer"),
            "summary_by_role": summarise(self.matrices, "role"),
            "matrices": [asdict(m) for m in self.matrices],
        }

    def rows(self) -> list[dict]:
        """One row per matrix and fine-tune; the fine-tune by its name (the JSON keeps its index)."""
        names = model_names(self.finetuned)
        return [
            {**m.row(), "finetuned": names[m.finetuned]} if m.finetuned is not None else m.row() for m in self.matrices
        ]

    def tables(self) -> list[Table]:
        if not self.finetuned:
            return self.base_tables()
        several = len(self.finetuned) > 1
        ft = ["fine-tune"] if several else []
        names = model_names(self.finetuned)
        k = self.options.k
        main = Table(
            f"spectrum: {len(self.matrices)} matrices, most changed first",
            [
                "matrix",
                *ft,
                "layer",
                "role",
                "‖ΔW‖/‖W‖",
                "σ'₁/σ₁",
                "intr.",
                "φ",
                "|u'₁·u₁|",
                "∠(W,W')°",
                "‖W'‖/‖W‖",
                f"top{k} share",
                "rank90 ΔW",
                "eff.rank",
                "shape",
            ],
            [
                [
                    m.name,
                    *([names[m.finetuned]] if several else []),
                    m.layer,
                    m.role,
                    m.relative_change,
                    m.amplification[0],
                    m.row()["intruders"],
                    m.subspace_similarity,
                    first(m.u_alignment),
                    m.direction.angle_deg,
                    m.direction.norm_ratio,
                    m.topk_change_share,
                    m.delta_rank90,
                    f"{m.base.effective_rank:.0f}→{m.ft.effective_rank:.0f}",
                    f"{m.shape[0]}×{m.shape[1]}",
                ]
                for m in sorted(self.matrices, key=lambda m: -m.relative_change)
            ],
            f"φ = ‖U_kᵀU'_k‖²/k, k = {k}; eff.rank = exp(entropy of σ) for W→W'; intr. = intruder dimensions; "
            "∠ between vec W and vec W'",
            numeric_from=2 if several else 1,
            names=True,
        )
        by = [
            Table(
                f"by {key}",
                [*ft, key, "matrices", "‖ΔW‖/‖W‖", "σ'/σ (top k)", "|u'·u| (top k)", "φ", "intruders"],
                [
                    [
                        *([names[s["finetuned"]]] if several else []),
                        s[key],
                        s["matrices"],
                        s["relative_change"],
                        s["mean_amplification_k"],
                        s["mean_u_alignment_k"],
                        s["subspace_similarity"],
                        s["intruders"],
                    ]
                    for s in summarise(self.matrices, key)
                ],
                numeric_from=2 if several else 1,
            )
            for key in ("layer", "role")
        ]
        return [main, *by]

    def base_tables(self) -> list[Table]:
        """One checkpoint's own spectra (`--values-only` without a fine-tune)."""
        main = Table(
            f"spectra: {len(self.matrices)} matrices",
            ["matrix", "layer", "role", "shape", "σ₁", "‖W‖_F", "stable rank", "eff.rank", "σ_min"],
            [
                [
                    m.name,
                    m.layer,
                    m.role,
                    f"{m.shape[0]}×{m.shape[1]}",
                    m.base.spectral,
                    m.base.frobenius,
                    m.base.stable_rank,
                    m.base.effective_rank,
                    first(m.sv_base[-1:]),
                ]
                for m in self.matrices
            ],
            "stable rank = ‖W‖_F²/σ₁²; eff.rank = exp(entropy of σ/Σσ)",
            numeric_from=1,
            names=True,
        )
        by = [
            Table(
                f"by {key}",
                [key, "matrices", "stable rank", "eff.rank"],
                [[s[key], s["matrices"], s["stable_rank"], s["effective_rank"]] for s in summarise(self.matrices, key)],
            )
            for key in ("layer", "role")
        ]
        return [main, *by]

    def headline(self) -> list[tuple[str, str, object]]:
        ms = self.matrices
        if not self.finetuned:
            return [
                ("spectrum.matrices", "matrices analysed", len(ms)),
                ("spectrum.mean_stable_rank", "mean stable rank", mean(lambda m: m.base.stable_rank)(ms)),
            ]
        top = max(ms, key=lambda m: m.relative_change) if ms else None
        by_role = max(summarise(ms, "role"), key=lambda s: s["relative_change"]) if ms else {}
        return [
            ("spectrum.matrices", "matrices analysed", len(ms)),
            (
                "spectrum.mean_relative_change",
                "mean ‖ΔW‖/‖W‖",
                sum(m.relative_change for m in ms) / len(ms) if ms else None,
            ),
            ("spectrum.most_changed", "most changed matrix", top.name if top else "-"),
            ("spectrum.most_changed_role", "most changed role", by_role.get("role", "-")),
            (
                "spectrum.intruders",
                "intruder dimensions",
                None if self.options.values_only else sum(len(m.intruders) for m in ms),
            ),
        ]

    def note(self) -> str:
        if not self.finetuned:
            return f"Spectra of {self.base} alone (values only)."
        return "Fine-tunes: " + ", ".join(described(self.finetuned))


def first(values: list) -> object:
    return values[0] if values else None


def summarise(matrices: Sequence[MatrixSpectrum], by: str) -> list[dict]:
    """Means per layer (or role), per fine-tune: where the change concentrates."""
    return group_summary(
        matrices,
        {"finetuned": lambda m: m.finetuned, by: lambda m: getattr(m, by)},
        {
            "matrices": len,
            "relative_change": mean(lambda m: m.relative_change),
            "mean_amplification_k": mean(lambda m: m.mean_amplification),
            "mean_u_alignment_k": mean(lambda m: m.mean_u_alignment),
            "subspace_similarity": mean(lambda m: m.subspace_similarity),
            "intruders": lambda ms: sum(len(m.intruders) for m in ms) if any(m.best_match_cos for m in ms) else None,
            "angle_deg": mean(lambda m: m.direction.angle_deg if m.direction else None),
            "norm_ratio": mean(lambda m: m.direction.norm_ratio if m.direction else None),
            "stable_rank": mean(lambda m: m.base.stable_rank),
            "effective_rank": mean(lambda m: m.base.effective_rank),
        },
    )


def norms_from_singular_values(s: torch.Tensor) -> list[Norms]:
    """Norms of each matrix in a batch from its singular values [b, r] (zero matrix -> zeros)."""
    s = s.double()
    spectral = s[:, 0]
    frob2 = (s * s).sum(-1)
    safe = torch.where(spectral > 0, spectral, torch.ones_like(spectral))
    stable = torch.where(spectral > 0, frob2 / safe**2, torch.zeros_like(spectral))
    p = s / s.sum(-1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)
    entropy = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)
    effective = torch.where(spectral > 0, torch.exp(entropy), torch.zeros_like(spectral))
    return [Norms(*vals) for vals in zip(spectral.tolist(), frob2.sqrt().tolist(), stable.tolist(), effective.tolist())]


def energy_rank(s: torch.Tensor, fraction: float) -> torch.Tensor:
    """Smallest r with Σ_{i≤r} s_i² ≥ fraction·Σ s_i², per row of a batch [b, r] (0 for a zero matrix)."""
    energy = (s.double() ** 2).cumsum(-1)
    total = energy[:, -1:]
    reached = energy >= fraction * total * (1 - 1e-12)
    rank = reached.int().argmax(-1) + 1
    return torch.where(total[:, 0] > 0, rank, torch.zeros_like(rank))


def compare(
    item: MatchedTensor,
    ft_index: int | None,
    w: torch.Tensor,
    base: GramSpectrum,
    w_ft: torch.Tensor | None,
    ft: GramSpectrum | None,
    delta_sv: torch.Tensor | None,
    options: SpectrumOptions,
    whole: Callable[[], GramSpectrum] | None = None,
) -> MatrixSpectrum:
    """All spectrum metrics of one matrix against one fine-tune (or none). `base` holds the top
    Gram eigenvectors, `ft` the fine-tune's top k (none for values only); `whole()` gives all the
    base's when an intruder candidate needs them."""
    s = base.S.to(w.device)
    keep = options.keep
    common = dict(
        name=item.names[0],
        finetuned=ft_index,
        layer=item.layer,
        role=item.role,
        shape=list(w.shape),
        base=norms_from_singular_values(s[None])[0],
        sv_base=s[:keep].tolist(),
    )
    vectors = dict(
        u_alignment=[], v_alignment=[], best_match_index=[], best_match_cos=[], intruders=[], subspace_similarity=None
    )  # values only: none
    if w_ft is None or ft is None:
        return MatrixSpectrum(
            **common,
            **vectors,
            ft=None,
            delta=None,
            relative_change=None,
            delta_rank90=None,
            delta_rank99=None,
            amplification=[],
            topk_change_share=None,
            sv_ft=[],
        )
    r = s.shape[-1]
    k = min(options.k, r)
    if options.values_only:
        s_ft = ft.S
    else:
        s_ft, top = triplets(w_ft, ft)
        _u_k, vh_k, cos = base_vectors(w, base, k, top.U, whole)
        best_cos, best_j = cos.max(-1)
        best = best_cos[: min(options.intruder_k, r)].tolist()
        vectors = dict(
            u_alignment=torch.diagonal(cos[:k, :k]).tolist(),
            v_alignment=(top.Vh[:k] * vh_k).sum(-1).abs().tolist(),
            best_match_index=best_j[: len(best)].tolist(),
            best_match_cos=best,
            intruders=[i for i, c in enumerate(best) if c < options.epsilon],
            subspace_similarity=float((cos[:k, :k] ** 2).sum() / k),
        )
    tiny = torch.finfo(torch.float64).tiny
    moved = (s_ft - s).abs()
    norms_w, norms_ft, norms_d = common["base"], *(norms_from_singular_values(x[None])[0] for x in (s_ft, delta_sv))
    return MatrixSpectrum(
        **common,
        **vectors,
        ft=norms_ft,
        delta=norms_d,
        relative_change=norms_d.frobenius / norms_w.frobenius if norms_w.frobenius > 0 else float("inf"),
        delta_rank90=int(energy_rank(delta_sv[None], 0.9)),
        delta_rank99=int(energy_rank(delta_sv[None], 0.99)),
        amplification=(s_ft[:k] / s[:k].clamp_min(tiny)).tolist(),
        topk_change_share=float(moved[:k].sum() / moved.sum().clamp_min(tiny)),
        sv_ft=s_ft[:keep].tolist(),
        direction=magnitude_direction(w, w_ft, norms_w, norms_ft, norms_d),
    )


def spectrum(
    base: Checkpoint,
    finetuned: Sequence[Checkpoint],
    options: SpectrumOptions = SpectrumOptions(),
    compute: Compute | None = None,
    on_progress: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    cache: DecompositionCache | None = None,
) -> SpectrumResult:
    """Compare every matched weight matrix of `base` with each fine-tune (checkpoints or adapters
    applied to `base`); with `options.values_only` and no fine-tune, the base's own spectra. The
    base is decomposed once per matrix and shared by all fine-tunes; every decomposition (the
    base's, each fine-tune's and each update's) is read from `cache` when it has it."""
    if not finetuned and not options.values_only:
        raise InvalidArgument(
            "spectrum: give at least one fine-tune of the base, or --values-only for the base's own spectra"
        )
    compute = compute or Compute.create()
    walk = TensorWalk([base, *finetuned], Selection.of(options), changed_by=finetuned)

    def work(batch: Batch, compute: Compute) -> list[MatrixSpectrum]:
        w, *w_fts = batch.tensors
        out = []
        for b, item in enumerate(batch.items):
            digest = tensor_digest(w[b]) if cache else None
            top_k = min(max(options.k, options.intruder_k), min(item.shape))  # the fine-tune's triplets
            values_only = options.values_only or not finetuned
            base_spec = decomposition(w[b], cache, 0 if values_only else top_columns(top_k, min(item.shape)), digest)
            whole = functools.cache(lambda b=b, digest=digest: decomposition(w[b], cache, None, digest))
            if not finetuned:
                out.append(compare(item, None, w[b], base_spec, None, None, None, options))
            for index, (ft, w_ft) in enumerate(zip(finetuned, w_fts)):
                if not may_change(ft, item.names[index + 1]):
                    continue  # an adapter's figures cover the matrices it changes, whatever else is given
                ft_digest = tensor_digest(w_ft[b]) if cache else None
                ft_spec = decomposition(w_ft[b], cache, 0 if values_only else top_k, ft_digest)
                digests = (digest, ft_digest) if digest and ft_digest else None
                delta_sv = update_singular_values(ft, item.names[0], w[b], w_ft[b], compute, cache, digests)
                out.append(compare(item, index, w[b], base_spec, w_ft[b], ft_spec, delta_sv, options, whole))
        return out

    matrices = walk.map(work, compute, on_start=on_start, on_progress=on_progress)
    return SpectrumResult(
        str(base.path),
        [str(f.path) for f in finetuned],
        options,
        walk.in_order(matrices, lambda m: m.name, lambda m: m.finetuned or 0),
        base.config.num_layers if base.config else None,
        walk.problems,
    )
