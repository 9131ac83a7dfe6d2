"""`weightlab quant-error`: what quantization did to each weight matrix, read as a change to the
weights. With W the full-precision matrix (N×M, N ≥ M after transposing) and Q its quantized
version (dequantized), the error is E = Q − W:

- relative error ‖E‖_F/‖W‖_F and SNR = 20·log10(‖W‖_F/‖E‖_F) dB; the model's own, Σ over matrices
  (√(Σ‖E‖²/Σ‖W‖²)), and bits per weight as stored (scales and minima included);
- noise-like or structured: for E with iid entries of any variance v, Marchenko & Pastur (1967)
  put λ_max(EᵀE) at v(√N + √M)² and Σλ at v·N·M, so E's stable rank Σλ/λ_max is N·M/(√N + √M)².
  flatness = stable rank(E) / that: ≈ 1 when the error is white noise (a flat spectrum), ≪ 1 when
  its energy sits in a few directions. Spikes: eigenvalues of EᵀE beyond the MP edge plus 2.02
  Tracy–Widom scales (`esd.marchenko_pastur`), and the share of ‖E‖² they hold;
- did the top singular directions and values survive: σ'_i/σ_i and the top-k subspace similarity
  φ = ‖U_kᵀU'_k‖²/k, with |⟨u'_1, u_1⟩|, as `spectrum` measures them (Si et al. 2025; Hu et al.
  2021, §7.2);
- the shift of WeightWatcher's power-law α of the eigenvalues of WᵀW (Martin & Mahoney 2021;
  `esd.fit_power_law`) from W to Q;
- the layers that suffer most: mean relative error per layer.

One pass over the matrices: every quantity comes from the singular values of W, Q and E and the
top-k vectors of W and Q (`compute.gram`), W's cached by content as `spectrum`'s are.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from weightlab.analysis.esd import fit_power_law, marchenko_pastur
from weightlab.analysis.spectrum import compare, first
from weightlab.analysis.summary import group_summary, mean
from weightlab.compute.cache import DecompositionCache, tensor_digest
from weightlab.compute.device import Compute
from weightlab.compute.spectra import decomposition, top_columns, update_values
from weightlab.compute.walk import Batch, Selection, TensorWalk
from weightlab.display import described, model_names
from weightlab.io.adapter import AdaptedCheckpoint
from weightlab.io.checkpoint import Checkpoint
from weightlab.matching import MatchedTensor
from weightlab.options import QuantErrorOptions, SpectrumOptions
from weightlab.results import Result, Table

NOISE_LIKE = 0.5  # flatness at or above: the error spreads like white noise
ZERO = 1e-10  # eigenvalues below ZERO·λ_max are rounding (as in `esd`)


@dataclass
class MatrixQuantError:
    """One matrix of one quantized model against the full-precision reference."""

    name: str
    quantized: int  # index into QuantErrorResult.quantized
    layer: int | None
    role: str
    shape: list[int]
    stored_as: str  # the quantized tensor's format (Q4_K, GPTQ int4 g128, BF16, …)
    bits_per_weight: float
    reference_norm: float  # ‖W‖_F
    error_norm: float  # ‖E‖_F
    relative_error: float
    snr_db: float | None  # None when E = 0 (no error: infinite SNR)
    flatness: float | None  # stable rank(E) / its Marchenko–Pastur value; None when E = 0
    spikes: int  # eigenvalues of EᵀE beyond the MP edge (+ 2.02 TW)
    spike_share: float | None  # ‖E‖² held by the spikes
    sv_ratio: list[float]  # σ'_i/σ_i, i < k
    subspace_similarity: float | None  # φ over the top k
    u1_alignment: float | None  # |⟨u'_1, u_1⟩|
    alpha_reference: float | None  # WeightWatcher's α of W
    alpha_quantized: float | None  # … of Q

    @property
    def noise_like(self) -> bool | None:
        return None if self.flatness is None else self.flatness >= NOISE_LIKE

    @property
    def alpha_shift(self) -> float | None:
        if self.alpha_reference is None or self.alpha_quantized is None:
            return None
        return self.alpha_quantized - self.alpha_reference

    @property
    def top_value_change(self) -> float | None:
        """max_i |σ'_i/σ_i − 1| over the top k."""
        return max(abs(r - 1) for r in self.sv_ratio) if self.sv_ratio else None

    def row(self) -> dict:
        return {
            **{k: v for k, v in asdict(self).items() if k not in ("shape", "sv_ratio")},
            "rows": self.shape[0],
            "cols": self.shape[1],
            "sv1_ratio": first(self.sv_ratio),
            "top_value_change": self.top_value_change,
            "noise_like": self.noise_like,
            "alpha_shift": self.alpha_shift,
        }


@dataclass
class QuantErrorResult(Result):
    SCHEMA = "weightlab.quant-error/1"
    TITLE = "Quantization: what it did to each matrix"
    REFERENCE = "Marchenko & Pastur 1967 (noise); Martin & Mahoney 2021 (α); Si et al. 2025 (spectra)"
    ORDER = 12

    reference: str
    quantized: list[str]
    options: QuantErrorOptions
    matrices: list[MatrixQuantError]
    num_layers: int | None = None
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "schema": self.SCHEMA,
            "reference": self.reference,
            "quantized": self.quantized,
            "options": asdict(self.options),
            "num_layers": self.num_layers,
            "problems": self.problems,
            "models": self.models(),
            "summary_by_layer": summarise(self.matrices, "layer"),
            "summary_by_role": summarise(self.matrices, "role"),
            "matrices": [asdict(m) for m in self.matrices],
        }

    def rows(self) -> list[dict]:
        names = model_names(self.quantized)
        return [{**m.row(), "quantized": names[m.quantized]} for m in self.matrices]

    def models(self) -> list[dict]:
        """Per quantized model: its overall error, bits and the layers that suffer most."""
        out = []
        for i, name in enumerate(self.quantized):
            ms = [m for m in self.matrices if m.quantized == i]
            ref2 = sum(m.reference_norm**2 for m in ms)
            err2 = sum(m.error_norm**2 for m in ms)
            params = sum(m.shape[0] * m.shape[1] for m in ms)
            relative = math.sqrt(err2 / ref2) if ref2 > 0 else None
            shifts = [m.alpha_shift for m in ms if m.alpha_shift is not None]
            out.append(
                {
                    "quantized": name,
                    "matrices": len(ms),
                    "relative_error": relative,
                    "snr_db": snr_db(relative),
                    "bits_per_weight": sum(m.bits_per_weight * m.shape[0] * m.shape[1] for m in ms) / params
                    if params
                    else None,
                    "noise_like_share": noise_like_share(ms),
                    "mean_subspace_similarity": mean(lambda m: m.subspace_similarity)(ms),
                    "mean_alpha_shift": sum(shifts) / len(shifts) if shifts else None,
                    "worst_layers": worst_layers(ms, 3),
                    "worst_matrix": max(ms, key=lambda m: m.relative_error).name if ms else None,
                }
            )
        return out

    def tables(self) -> list[Table]:
        several = len(self.quantized) > 1
        names = model_names(self.quantized)
        q = ["quantized"] if several else []
        k = self.options.k
        overall = Table(
            "per quantized model",
            [
                "quantized",
                "matrices",
                "bits/weight",
                "‖E‖/‖W‖",
                "SNR dB",
                "noise-like",
                "φ (top k)",
                "Δα",
                "worst layers",
            ],
            [
                [
                    names[i],
                    s["matrices"],
                    s["bits_per_weight"],
                    s["relative_error"],
                    s["snr_db"],
                    s["noise_like_share"],
                    s["mean_subspace_similarity"],
                    s["mean_alpha_shift"],
                    ", ".join(map(str, s["worst_layers"])) or "-",
                ]
                for i, s in enumerate(self.models())
            ],
            "‖E‖/‖W‖ over the whole model (√(Σ‖E‖²/Σ‖W‖²)); noise-like: share of matrices whose error "
            f"spectrum is flat (flatness ≥ {NOISE_LIKE}); Δα: mean shift of WeightWatcher's α",
            numeric_from=1,
        )
        main = Table(
            f"quantization error: {len(self.matrices)} matrices, worst first",
            [
                "matrix",
                *q,
                "layer",
                "role",
                "stored as",
                "bits/weight",
                "‖E‖/‖W‖",
                "SNR dB",
                "flatness",
                "spikes",
                "σ'₁/σ₁",
                f"φ (top {k})",
                "α",
                "Δα",
            ],
            [
                [
                    m.name,
                    *([names[m.quantized]] if several else []),
                    m.layer,
                    m.role,
                    m.stored_as,
                    m.bits_per_weight,
                    m.relative_error,
                    m.snr_db,
                    m.flatness,
                    m.spikes,
                    first(m.sv_ratio),
                    m.subspace_similarity,
                    m.alpha_reference,
                    m.alpha_shift,
                ]
                for m in sorted(self.matrices, key=lambda m: -m.relative_error)
            ],
            "E = Q − W; flatness = stable rank(E) over a white-noise matrix's (1: noise-like, ≪ 1: "
            "structured); spikes: eigenvalues of EᵀE beyond the Marchenko–Pastur edge; φ = ‖U_kᵀU'_k‖²/k",
            numeric_from=2 if several else 1,
            names=True,
        )
        by = [
            Table(
                f"by {key}",
                [*q, key, "matrices", "‖E‖/‖W‖", "SNR dB", "flatness", "φ (top k)", "Δα"],
                [
                    [
                        *([names[s["quantized"]]] if several else []),
                        s[key],
                        s["matrices"],
                        s["relative_error"],
                        s["snr_db"],
                        s["flatness"],
                        s["subspace_similarity"],
                        s["alpha_shift"],
                    ]
                    for s in summarise(self.matrices, key)
                ],
                numeric_from=2 if several else 1,
            )
            for key in ("layer", "role")
        ]
        return [main, overall, *by]

    def headline(self) -> list[tuple[str, str, object]]:
        models = self.models()
        if not models:
            return [("quant.matrices", "matrices analysed", 0)]
        worst = max(models, key=lambda s: s["relative_error"] or 0)
        which = (
            [("quant.worst_model", "largest error", model_names(self.quantized)[models.index(worst)])]
            if len(models) > 1
            else []
        )
        return [
            *which,
            ("quant.matrices", "matrices analysed", len(self.matrices)),
            ("quant.bits_per_weight", "bits per weight", worst["bits_per_weight"]),
            ("quant.relative_error", "‖E‖/‖W‖ (model)", worst["relative_error"]),
            ("quant.snr_db", "SNR dB (model)", worst["snr_db"]),
            ("quant.noise_like", "noise-like matrices", worst["noise_like_share"]),
            ("quant.worst_layers", "worst layers", ", ".join(map(str, worst["worst_layers"])) or "-"),
        ]

    def lines(self) -> list[str]:
        names = model_names(self.quantized)
        out = []
        for i, s in enumerate(self.models()):
            if s["relative_error"] is None:
                continue
            if s["snr_db"] is None:
                out.append(f"{names[i]}: every matrix is exactly the reference's")
                continue
            where = (
                f"worst layers {', '.join(map(str, s['worst_layers']))}" if s["worst_layers"] else "no layered matrix"
            )
            out.append(
                f"{names[i]}: {s['bits_per_weight']:.2f} bits/weight, ‖E‖/‖W‖ = {s['relative_error']:.2%} "
                f"({s['snr_db']:.1f} dB); {where}; worst matrix {s['worst_matrix']}"
            )
        return out

    def note(self) -> str:
        return f"Reference {self.reference}; quantized: " + ", ".join(described(self.quantized))


def snr_db(relative_error: float | None) -> float | None:
    """20·log10(‖W‖/‖E‖); None for no error (or nothing measured)."""
    return -20 * math.log10(relative_error) if relative_error else None


def noise_like_share(matrices: Sequence[MatrixQuantError]) -> float | None:
    """The share of matrices with an error whose error is noise-like (None: no matrix has one)."""
    judged = [m.noise_like for m in matrices if m.noise_like is not None]
    return sum(judged) / len(judged) if judged else None


def worst_layers(matrices: Sequence[MatrixQuantError], n: int) -> list[int]:
    """The n layers of largest mean relative error, worst first (none where nothing changed)."""
    by_layer: dict[int, list[float]] = {}
    for m in matrices:
        if m.layer is not None and m.relative_error > 0:
            by_layer.setdefault(m.layer, []).append(m.relative_error)
    return sorted(by_layer, key=lambda layer: -sum(by_layer[layer]) / len(by_layer[layer]))[:n]


def summarise(matrices: Sequence[MatrixQuantError], by: str) -> list[dict]:
    return group_summary(
        matrices,
        {"quantized": lambda m: m.quantized, by: lambda m: getattr(m, by)},
        {
            "matrices": len,
            "relative_error": mean(lambda m: m.relative_error),
            "snr_db": mean(lambda m: m.snr_db),
            "flatness": mean(lambda m: m.flatness),
            "subspace_similarity": mean(lambda m: m.subspace_similarity),
            "alpha_shift": mean(lambda m: m.alpha_shift),
        },
    )


def noise_flatness(error_sv: torch.Tensor, rows: int, cols: int) -> float | None:
    """stable rank(E) · (√N + √M)² / (N·M): 1 for white noise, → 1/min(N, M)·… for rank one."""
    lam = error_sv.double() ** 2
    if not float(lam[0]) > 0:
        return None
    expected = rows * cols / (math.sqrt(rows) + math.sqrt(cols)) ** 2
    return float(lam.sum() / lam[0]) / expected


def power_law_alpha(sv: torch.Tensor, min_evals: int) -> float | None:
    """WeightWatcher's α of the eigenvalues σ² (non-zero ones), None when too few to fit."""
    lam = (sv.double() ** 2).cpu().numpy()
    nonzero = lam[lam > ZERO * lam[0]] if lam[0] > 0 else lam[:0]
    return fit_power_law(nonzero).alpha if len(nonzero) >= min_evals else None


def measure(
    item: MatchedTensor,
    index: int,
    stored: tuple[str, float],
    w: torch.Tensor,
    spectra: tuple,
    error_sv: torch.Tensor,
    options: QuantErrorOptions,
    whole: Callable,
) -> MatrixQuantError:
    """Every figure of one matrix of one quantized model (`spectra`: W's and Q's decompositions)."""
    base_spec, q_spec, w_q = spectra
    k = min(options.k, min(w.shape))
    change = compare(item, index, w, base_spec, w_q, q_spec, error_sv, SpectrumOptions(k=k, intruder_k=k), whole)
    rows, cols = w.shape
    lam = (error_sv.double() ** 2).cpu().numpy()
    total = float(lam.sum())
    spikes, spike_share = 0, None
    if total > 0:
        mp = marchenko_pastur(lam, rows, cols)
        spikes = mp.spikes
        spike_share = float(np.sort(lam)[::-1][:spikes].sum() / total)
    assert change.delta is not None and change.relative_change is not None
    return MatrixQuantError(
        name=item.names[0],
        quantized=index,
        layer=item.layer,
        role=item.role,
        shape=list(w.shape),
        stored_as=stored[0],
        bits_per_weight=stored[1],
        reference_norm=change.base.frobenius,
        error_norm=change.delta.frobenius,
        relative_error=change.relative_change,
        snr_db=snr_db(change.relative_change),
        flatness=noise_flatness(error_sv, rows, cols),
        spikes=spikes,
        spike_share=spike_share,
        sv_ratio=change.amplification,
        subspace_similarity=change.subspace_similarity,
        u1_alignment=first(change.u_alignment),
        alpha_reference=power_law_alpha(base_spec.S, options.min_evals),
        alpha_quantized=power_law_alpha(q_spec.S, options.min_evals),
    )


def stored_as(ckpt: Checkpoint, name: str) -> tuple[str, float]:
    """A tensor's storage format and bits per weight."""
    info = ckpt.info(name)
    if info.stored is not None:
        return info.stored.format, info.stored.bits_per_weight
    return info.dtype, 8 * info.nbytes / max(info.numel, 1)


def quant_error(
    reference: Checkpoint,
    quantized: Sequence[Checkpoint],
    options: QuantErrorOptions = QuantErrorOptions(),
    compute: Compute | None = None,
    on_progress: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    cache: DecompositionCache | None = None,
) -> QuantErrorResult:
    """Compare every matched weight matrix of the full-precision `reference` with each quantized
    model (read dequantized); W's decompositions are shared by every quantized model and read
    from `cache` when it has them."""
    compute = compute or Compute.create()
    walk = TensorWalk([reference, *quantized], Selection.of(options))

    def work(batch: Batch, compute: Compute) -> list[MatrixQuantError]:
        w, *w_qs = batch.tensors
        out = []
        for b, item in enumerate(batch.items):
            digest = tensor_digest(w[b]) if cache else None
            k = min(options.k, min(item.shape))
            base_spec = decomposition(w[b], cache, top_columns(k, min(item.shape)), digest)
            whole = functools.cache(lambda b=b, digest=digest: decomposition(w[b], cache, None, digest))
            for index, (q, w_q) in enumerate(zip(quantized, w_qs)):
                q_spec = decomposition(w_q[b], None, k)  # a quantized model is rarely analysed twice
                error_sv = update_values(w[b], w_q[b], None)  # dense E, a LoRA on Q included
                stored = stored_as(q, item.names[index + 1])
                out.append(measure(item, index, stored, w[b], (base_spec, q_spec, w_q[b]), error_sv, options, whole))
        return out

    matrices = walk.map(work, compute, on_start=on_start, on_progress=on_progress)
    return QuantErrorResult(
        str(reference.path),
        [f"{q.base.path} + {q.path}" if isinstance(q, AdaptedCheckpoint) else str(q.path) for q in quantized],
        options,
        walk.in_order(matrices, lambda m: m.name, lambda m: m.quantized),
        reference.config.num_layers if reference.config else None,
        walk.problems,
    )
