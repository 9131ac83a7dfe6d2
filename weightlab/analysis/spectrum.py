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
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch

from weightlab.analysis.deltas import delta_singular_values
from weightlab.analysis.summary import group_summary, mean
from weightlab.compute.device import Compute
from weightlab.compute.svd import SVD, full_svd
from weightlab.compute.walk import Filters, Selection, TensorWalk
from weightlab.domains import Int, Real, option
from weightlab.io.checkpoint import Checkpoint
from weightlab.matching import MatchedTensor
from weightlab.results import Result, Table

@dataclass(frozen=True)
class SpectrumOptions(Filters):
    k: int = option(8, Int(1), "-k")  # top singular values/vectors for amplification and reorientation
    intruder_k: int = option(10, Int(1), "--intruder-k")  # top fine-tuned singular vectors checked for intruders
    epsilon: float = option(0.5, Real(0, 1), "--epsilon")  # intruder threshold on max_j |cos(u'_i, u_j)|
    keep: int | None = option(None, Int(1, optional=True), "--keep")  # singular values kept per matrix (None = all)


@dataclass
class Norms:
    spectral: float
    frobenius: float
    stable_rank: float
    effective_rank: float


@dataclass
class MatrixSpectrum:
    name: str
    finetuned: int  # index into SpectrumResult.finetuned
    layer: int | None
    role: str
    shape: list[int]
    base: Norms
    ft: Norms
    delta: Norms
    relative_change: float  # ‖ΔW‖_F / ‖W‖_F
    delta_rank90: int
    delta_rank99: int
    amplification: list[float]  # σ'_i/σ_i, i < k
    topk_change_share: float  # Σ_{i<k}|σ'_i−σ_i| / Σ_i|σ'_i−σ_i|
    u_alignment: list[float]  # |⟨u'_i, u_i⟩|, i < k
    v_alignment: list[float]
    best_match_index: list[int]  # argmax_j |⟨u'_i, u_j⟩|, i < intruder_k
    best_match_cos: list[float]
    intruders: list[int]  # i < intruder_k with best_match_cos < ε
    subspace_similarity: float
    sv_base: list[float]
    sv_ft: list[float]

    @property
    def mean_amplification(self) -> float:
        return sum(self.amplification) / len(self.amplification)

    @property
    def mean_u_alignment(self) -> float:
        return sum(self.u_alignment) / len(self.u_alignment)

    def row(self) -> dict:
        """Flat scalar columns for CSV and tables."""
        return {
            "name": self.name, "finetuned": self.finetuned, "layer": self.layer, "role": self.role,
            "rows": self.shape[0], "cols": self.shape[1], "relative_change": self.relative_change,
            "amplification_1": self.amplification[0], "mean_amplification_k": self.mean_amplification,
            "topk_change_share": self.topk_change_share, "delta_rank90": self.delta_rank90,
            "delta_rank99": self.delta_rank99, "u1_alignment": self.u_alignment[0],
            "mean_u_alignment_k": self.mean_u_alignment, "subspace_similarity": self.subspace_similarity,
            "intruders": len(self.intruders),
            **{f"{part}_{k}": v for part in ("base", "ft", "delta") for k, v in asdict(getattr(self, part)).items()},
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
        return {"schema": self.SCHEMA, "base": self.base, "finetuned": self.finetuned,
                "options": asdict(self.options), "num_layers": self.num_layers, "problems": self.problems,
                "summary_by_layer": summarise(self.matrices, "layer"),
                "summary_by_role": summarise(self.matrices, "role"),
                "matrices": [asdict(m) for m in self.matrices]}

    def rows(self) -> list[dict]:
        return [m.row() for m in self.matrices]

    def tables(self) -> list[Table]:
        several = len(self.finetuned) > 1
        ft = ["ft"] if several else []
        k = self.options.k
        main = Table(f"spectrum: {len(self.matrices)} matrices, most changed first",
                     ["matrix", *ft, "layer", "role", "shape", "‖ΔW‖/‖W‖", "σ'₁/σ₁", f"top{k} share", "rank90 ΔW",
                      "eff.rank", "|u'₁·u₁|", "φ", "intr."],
                     [[m.name, *([m.finetuned] if several else []), m.layer, m.role, f"{m.shape[0]}×{m.shape[1]}",
                       m.relative_change, m.amplification[0], m.topk_change_share, m.delta_rank90,
                       f"{m.base.effective_rank:.0f}→{m.ft.effective_rank:.0f}", m.u_alignment[0], m.subspace_similarity,
                       len(m.intruders)] for m in sorted(self.matrices, key=lambda m: -m.relative_change)],
                     f"φ = ‖U_kᵀU'_k‖²/k, k = {k}; eff.rank = exp(entropy of σ) for W→W'; intr. = intruder dimensions",
                     numeric_from=2 if several else 1, names=True)
        by = [Table(f"by {key}", [*ft, key, "matrices", "‖ΔW‖/‖W‖", "σ'/σ (top k)", "|u'·u| (top k)", "φ", "intruders"],
                    [[*([s["finetuned"]] if several else []), s[key], s["matrices"], s["relative_change"],
                      s["mean_amplification_k"], s["mean_u_alignment_k"], s["subspace_similarity"], s["intruders"]]
                     for s in summarise(self.matrices, key)], numeric_from=2 if several else 1)
              for key in ("layer", "role")]
        return [main, *by]

    def headline(self) -> list[tuple[str, str, object]]:
        ms = self.matrices
        top = max(ms, key=lambda m: m.relative_change) if ms else None
        by_role = max(summarise(ms, "role"), key=lambda s: s["relative_change"]) if ms else {}
        return [("spectrum.matrices", "matrices analysed", len(ms)),
                ("spectrum.mean_relative_change", "mean ‖ΔW‖/‖W‖",
                 sum(m.relative_change for m in ms) / len(ms) if ms else None),
                ("spectrum.most_changed", "most changed matrix", top.name if top else "-"),
                ("spectrum.most_changed_role", "most changed role", by_role.get("role", "-")),
                ("spectrum.intruders", "intruder dimensions", sum(len(m.intruders) for m in ms))]

    def note(self) -> str:
        return "Fine-tunes: " + ", ".join(f"{i}: {p}" for i, p in enumerate(self.finetuned))


def summarise(matrices: Sequence[MatrixSpectrum], by: str) -> list[dict]:
    """Means per layer (or role), per fine-tune: where the change concentrates."""
    return group_summary(matrices, {"finetuned": lambda m: m.finetuned, by: lambda m: getattr(m, by)}, {
        "matrices": len,
        "relative_change": mean(lambda m: m.relative_change),
        "mean_amplification_k": mean(lambda m: m.mean_amplification),
        "mean_u_alignment_k": mean(lambda m: m.mean_u_alignment),
        "subspace_similarity": mean(lambda m: m.subspace_similarity),
        "intruders": lambda ms: sum(len(m.intruders) for m in ms),
    })


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


def compare(base: SVD, ft: SVD, delta_sv: torch.Tensor, items: Sequence[MatchedTensor], ft_index: int,
            options: SpectrumOptions) -> list[MatrixSpectrum]:
    """All spectrum metrics for a batch: base and fine-tuned thin SVDs and ΔW's singular values."""
    r = base.S.shape[-1]
    k, kk = min(options.k, r), min(max(options.k, options.intruder_k), r)
    cos = (ft.U[..., :kk].mT @ base.U).abs()  # [b, kk, r]: |⟨u'_i, u_j⟩|
    index_matched = torch.diagonal(cos[:, :k, :k], dim1=-2, dim2=-1)
    v_matched = (ft.Vh[:, :k, :] * base.Vh[:, :k, :]).sum(-1).abs()
    best_cos, best_j = cos.max(-1)
    phi = (cos[:, :k, :k] ** 2).sum((-2, -1)) / k
    amplification = ft.S[:, :k] / base.S[:, :k].clamp_min(torch.finfo(base.S.dtype).tiny)
    moved = (ft.S - base.S).abs()
    share = moved[:, :k].sum(-1) / moved.sum(-1).clamp_min(torch.finfo(moved.dtype).tiny)
    norms_w, norms_ft, norms_d = (norms_from_singular_values(s) for s in (base.S, ft.S, delta_sv))
    r90, r99 = energy_rank(delta_sv, 0.9).tolist(), energy_rank(delta_sv, 0.99).tolist()
    keep = options.keep
    results = []
    for b, item in enumerate(items):
        intruder_k = min(options.intruder_k, r)
        best = best_cos[b, :intruder_k].tolist()
        results.append(MatrixSpectrum(
            name=item.names[0], finetuned=ft_index, layer=item.layer, role=item.role,
            shape=list(base.U.shape[-2:-1]) + list(base.Vh.shape[-1:]),
            base=norms_w[b], ft=norms_ft[b], delta=norms_d[b],
            relative_change=norms_d[b].frobenius / norms_w[b].frobenius if norms_w[b].frobenius > 0 else float("inf"),
            delta_rank90=r90[b], delta_rank99=r99[b],
            amplification=amplification[b].tolist(), topk_change_share=float(share[b]),
            u_alignment=index_matched[b].tolist(), v_alignment=v_matched[b].tolist(),
            best_match_index=best_j[b, :intruder_k].tolist(), best_match_cos=best,
            intruders=[i for i, c in enumerate(best) if c < options.epsilon],
            subspace_similarity=float(phi[b]),
            sv_base=base.S[b, :keep].tolist(), sv_ft=ft.S[b, :keep].tolist(),
        ))
    return results


def spectrum(base: Checkpoint, finetuned: Sequence[Checkpoint], options: SpectrumOptions = SpectrumOptions(),
             compute: Compute | None = None, on_progress: Callable[[int], None] | None = None,
             on_start: Callable[[int], None] | None = None) -> SpectrumResult:
    """Compare every matched weight matrix of `base` with each fine-tune (checkpoints or adapters
    applied to `base`). The base's SVD is computed once per matrix and shared by all fine-tunes."""
    compute = compute or Compute.create()
    walk = TensorWalk([base, *finetuned], Selection.of(options), changed_by=finetuned)
    matrices: list[MatrixSpectrum] = []
    for batch in walk.batches(compute, on_start=on_start, on_progress=on_progress):
        w, *w_fts = batch.tensors
        base_svd = full_svd(w)
        for index, (ft, w_ft) in enumerate(zip(finetuned, w_fts)):
            delta_sv = delta_singular_values(ft, batch.items, w, w_ft, compute)
            matrices.extend(compare(base_svd, full_svd(w_ft), delta_sv, batch.items, index, options))
        del w, w_fts, base_svd, batch  # before the next batch arrives: keeps one batch in memory
    return SpectrumResult(str(base.path), [str(f.path) for f in finetuned], options,
                          walk.in_order(matrices, lambda m: m.name, lambda m: m.finetuned),
                          base.config.num_layers if base.config else None, walk.problems)
