"""`weightlab esd`: the empirical spectral density of every weight matrix, as heavy-tailed
self-regularisation reads it (and as WeightWatcher reports it), for the weights and for ΔW.

Martin & Mahoney 2021, "Implicit self-regularization in deep neural networks" (JMLR 22:165) and
Martin, Peng & Mahoney 2021, "Predicting trends in the quality of state-of-the-art neural
networks without access to training or testing data" (Nat. Commun. 12:4122). For W (N×M, N ≥ M)
the eigenvalues λ_i = σ_i² of WᵀW (no 1/N: WeightWatcher's default, so α and the logs compare):

- power-law tail p(λ) ∝ λ^−α for λ ≥ λ_min, continuous MLE α = 1 + n / Σ ln(λ_i/λ_min) with λ_min
  chosen among the eigenvalues by the smallest Kolmogorov–Smirnov distance
  D = max |1 − (λ/λ_min)^(1−α) − F_emp| (Clauset, Shalizi & Newman 2009, eqs. 3.1 and 3.9);
  σ_α = (α − 1)/√n. WeightWatcher's fit, term for term (its `WW_powerlaw.WWFit`).
- α̂ = α·log10 λ_max (alpha-weighted), log10 Σλ (log Frobenius norm²), log10 λ_max (log spectral
  norm), log10 Σλ^α (log α-norm), stable rank Σλ/λ_max, entropy of σ²/Σσ² over ln(rank).
- Marchenko–Pastur bulk: for iid entries of variance v, λ ∈ [v(√N − √M)², v(√N + √M)²]
  (Marchenko & Pastur 1967). v = median(λ)/(N·μ_y), μ_y the median of the MP law of ratio
  y = M/N (Gavish & Donoho 2014): the median barely moves with spikes or a heavy tail, where a
  mean or WeightWatcher's density fit do. A spike is λ beyond the edge plus 2.02 Tracy–Widom scales
  v(√N + √M)(1/√N + 1/√M)^(1/3) (Johnstone 2001; 2.02 is TW₁'s 99th percentile, so a random
  matrix shows a spike in about 1% of cases). MP soft rank = edge/λ_max (WeightWatcher's).
- Correlation traps: the entries of W − mean(W), shuffled with a seeded permutation, make a
  matrix with no correlations; eigenvalues of that beyond its own MP edge (v is then the exact
  entry variance) come from a few huge entries, not from learning (Martin & Mahoney 2021, §5).
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from scipy import integrate, optimize

from weightlab.analysis.summary import group_summary, mean, total
from weightlab.compute.device import Compute
from weightlab.compute.gram import eigenvalues, gram
from weightlab.compute.spectra import energy_entropy
from weightlab.compute.walk import Batch, Selection, TensorWalk, select
from weightlab.io.checkpoint import Checkpoint
from weightlab.options import ESDOptions
from weightlab.results import Result, Table

TRACY_WIDOM_99 = 2.02  # 99th percentile of the Tracy–Widom (β = 1) law
ZERO = 1e-10  # eigenvalues below ZERO·λ_max are rounding, not spectrum (WeightWatcher: an absolute 1e-5)
OVER_TRAINED, UNDER_TRAINED = 2.0, 6.0  # WeightWatcher's warnings: α < 2, α > 6


@dataclass
class PowerLaw:
    """The tail fit: p(λ) ∝ λ^−alpha on [xmin, xmax]."""

    alpha: float
    xmin: float
    xmax: float
    ks_distance: float
    sigma: float  # standard error of alpha, (alpha − 1)/√n
    tail: int  # eigenvalues ≥ xmin (WeightWatcher's num_pl_spikes)


@dataclass
class MarchenkoPastur:
    """The random bulk: its entry variance, edges and what lies beyond."""

    variance: float  # v, per entry
    bulk_min: float
    bulk_max: float  # λ₊ = v(√N + √M)²
    tracy_widom: float  # the scale of λ_max's fluctuation at the edge
    spikes: int  # λ > λ₊ + 2.02·tracy_widom
    soft_rank: float  # λ₊ / λ_max


@dataclass
class SpectralDensity:
    """Everything the eigenvalues of one matrix say."""

    num_evals: int  # M = min(N, M)
    nonzero: int  # eigenvalues above ZERO·λ_max
    lambda_max: float
    log_norm: float  # log10 Σλ = log10 ‖W‖_F²
    log_spectral_norm: float  # log10 λ_max
    stable_rank: float  # Σλ / λ_max
    entropy: float  # −Σ p ln p / ln(rank), p = λ/Σλ
    power_law: PowerLaw | None
    alpha_weighted: float | None  # α·log10 λ_max
    log_alpha_norm: float | None  # log10 Σλ^α
    warning: str  # "over-trained" (α < 2), "under-trained" (α > 6), or why there is no fit
    mp: MarchenkoPastur
    traps: int | None = None  # correlation traps: spikes of the shuffled matrix
    rand_lambda_max: float | None = None
    rand_bulk_max: float | None = None
    eigenvalues: list[float] = field(default_factory=list)  # descending

    @property
    def alpha(self) -> float | None:
        return None if self.power_law is None else self.power_law.alpha


@dataclass
class MatrixESD:
    name: str
    layer: int | None
    role: str
    shape: list[int]
    weights: SpectralDensity
    delta: SpectralDensity | None = None  # ΔW = W − W_base, with --base

    def row(self) -> dict:
        out = {"name": self.name, "layer": self.layer, "role": self.role, "rows": self.shape[0], "cols": self.shape[1]}
        for prefix, d in (("w", self.weights), ("dw", self.delta)):
            if d is not None:
                out.update({f"{prefix}_{k}": v for k, v in _flat(d).items()})
        return out


@dataclass
class Skipped:
    name: str
    reason: str


def fit_power_law(evals: np.ndarray) -> PowerLaw:
    """The continuous power-law fit of Clauset, Shalizi & Newman 2009 with λ_min at the smallest
    KS distance over every candidate but the largest value (as WeightWatcher's WWFit): α_i =
    1 + n_i / Σ_{j≥i} ln(λ_j/λ_i), D_i = max_{j≥i} |1 − (λ_j/λ_i)^(1−α_i) − (j − i)/n_i|."""
    x = np.sort(np.asarray(evals, dtype=np.float64))
    logs = np.log(x)
    total = len(x)
    suffix = np.cumsum(logs[::-1])[::-1]
    start = np.arange(total - 1)
    n = (total - start).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        alphas = 1 + n / (suffix[:-1] - n * logs[:-1])
    distances = np.ones(total - 1)
    j = np.arange(total)
    for lo in range(0, total - 1, 256):  # 256 candidates at a time: O(256·M) memory
        i = start[lo : lo + 256]
        a = alphas[i][:, None]
        with np.errstate(over="ignore", invalid="ignore"):
            model = 1 - np.exp((1 - a) * (logs[None, :] - logs[i][:, None]))
            gap = np.abs(model - (j[None, :] - i[:, None]) / n[i][:, None])
        gap = np.where(j[None, :] >= i[:, None], gap, 0.0)
        fits = np.isfinite(alphas[i]) & (alphas[i] > 1)
        distances[lo : lo + 256] = np.where(fits, np.nan_to_num(gap.max(axis=1), nan=1.0), 1.0)
    best = int(np.argmin(distances))
    alpha = float(alphas[best])
    return PowerLaw(
        alpha, float(x[best]), float(x[-1]), float(distances[best]), (alpha - 1) / math.sqrt(n[best]), int(total - best)
    )


@functools.lru_cache(maxsize=256)
def mp_median(ratio: float) -> float:
    """The median of the Marchenko–Pastur law with aspect ratio y = M/N ≤ 1 and unit variance
    (eigenvalues of WᵀW/N), by integrating its density (Gavish & Donoho 2014, eq. 9's μ_β)."""
    a, b = (1 - math.sqrt(ratio)) ** 2, (1 + math.sqrt(ratio)) ** 2
    pdf = lambda x: math.sqrt(max((b - x) * (x - a), 0.0)) / (2 * math.pi * ratio * x)
    cdf = lambda x: integrate.quad(pdf, a, x, limit=200)[0]
    return float(optimize.brentq(lambda x: cdf(x) - 0.5, a, b, xtol=1e-12))


def marchenko_pastur(evals: np.ndarray, rows: int, cols: int, variance: float | None = None) -> MarchenkoPastur:
    """The MP bulk of the eigenvalues of WᵀW for an N×M matrix (any order of `rows`, `cols`): with
    `variance` given, its edges; else v from the median eigenvalue, v = median(λ) / (N·μ_y) —
    robust to spikes and heavy tails, which move the median little (Gavish & Donoho 2014)."""
    big, small = max(rows, cols), min(rows, cols)
    lam = np.sort(np.asarray(evals, dtype=np.float64))[::-1]
    root = math.sqrt(big) + math.sqrt(small)
    scale = root * (1 / math.sqrt(big) + 1 / math.sqrt(small)) ** (1 / 3)
    v = variance if variance is not None else float(np.median(lam)) / (big * mp_median(small / big))
    edge = v * root**2
    above = max(edge + TRACY_WIDOM_99 * v * scale, ZERO * float(lam[0]))  # rounding is never a spike
    spikes = int(np.count_nonzero(lam > above)) if v > 0 or variance is None else 0
    return MarchenkoPastur(
        v,
        v * (math.sqrt(big) - math.sqrt(small)) ** 2,
        edge,
        v * scale,
        spikes,
        edge / float(lam[0]) if lam[0] > 0 else float("nan"),
    )


def shuffled(x: torch.Tensor, seed: int) -> torch.Tensor:
    """The entries of x permuted by a seeded generator: the same entries, no correlations."""
    order = torch.randperm(x.numel(), generator=torch.Generator().manual_seed(seed)).to(x.device)
    return x.reshape(-1)[order].reshape(x.shape)


def _log10(value: float) -> float:
    return math.log10(value) if value > 0 else float("-inf")


def matrix_seed(seed: int, name: str) -> int:
    """A tensor's own seed: the same whatever else is analysed, and in whatever order."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def density(w: torch.Tensor, options: ESDOptions, seed: int) -> SpectralDensity:
    """The spectral density record of one 2-D matrix (any device; eigenvalues in float64)."""
    rows, cols = w.shape
    lam = eigenvalues(gram(w)).clamp_min(0).cpu().numpy()
    top = float(lam[0])
    nonzero = lam[lam > ZERO * top] if top > 0 else lam[:0]
    total = float(lam.sum())
    entropy = energy_entropy(torch.from_numpy(nonzero)) / math.log(len(nonzero)) if len(nonzero) > 1 else 0.0
    fit = fit_power_law(nonzero) if len(nonzero) >= options.min_evals else None
    warning = (
        f"no fit: {len(nonzero)} non-zero eigenvalues (--min-evals {options.min_evals})"
        if fit is None
        else "over-trained"
        if fit.alpha < OVER_TRAINED
        else "under-trained"
        if fit.alpha > UNDER_TRAINED
        else ""
    )
    record = SpectralDensity(
        len(lam),
        len(nonzero),
        top,
        _log10(total),
        _log10(top),
        total / top if top > 0 else 0.0,
        entropy,
        fit,
        None if fit is None else fit.alpha * _log10(top),
        None if fit is None else _log10(float(np.sum(nonzero**fit.alpha))),
        warning,
        marchenko_pastur(lam, rows, cols),
        eigenvalues=[float(v) for v in lam],
    )
    if options.traps and top > 0:  # W − mean(W), shuffled: the mean is no trap
        centred = w - w.mean()
        variance = float(torch.linalg.vector_norm(centred, dtype=torch.float64)) ** 2 / centred.numel()
        rand = eigenvalues(gram(shuffled(centred, seed))).clamp_min(0).cpu().numpy()
        mp = marchenko_pastur(rand, rows, cols, variance)
        record.traps, record.rand_lambda_max, record.rand_bulk_max = mp.spikes, float(rand[0]), mp.bulk_max
    return record


@dataclass
class ESDResult(Result):
    SCHEMA = "weightlab.esd/1"
    TITLE = "Empirical spectral densities"
    REFERENCE = "Martin & Mahoney 2021 (JMLR 22:165; Nat. Commun. 12:4122); Clauset, Shalizi & Newman 2009"
    ORDER = 15

    checkpoint: str
    base: str | None
    options: ESDOptions
    matrices: list[MatrixESD]
    skipped: list[Skipped] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "schema": self.SCHEMA,
            "checkpoint": self.checkpoint,
            "base": self.base,
            "options": asdict(self.options),
            "problems": self.problems,
            "skipped": [asdict(s) for s in self.skipped],
            "summary": self.summary(),
            "summary_by_layer": summarise_esd(self.matrices, "layer"),
            "summary_by_role": summarise_esd(self.matrices, "role"),
            "matrices": [asdict(m) for m in self.matrices],
        }

    def summary(self) -> dict:
        out = {"matrices": len(self.matrices)}
        for part in ("weights", "delta"):
            dens = [getattr(m, part) for m in self.matrices if getattr(m, part) is not None]
            fitted = [d for d in dens if d.power_law is not None]
            if dens:
                out[part] = {
                    "mean_alpha": _mean([d.alpha for d in fitted]),
                    "mean_alpha_weighted": _mean([d.alpha_weighted for d in fitted]),
                    "mean_log_spectral_norm": _mean([d.log_spectral_norm for d in dens]),
                    "mean_stable_rank": _mean([d.stable_rank for d in dens]),
                    "spikes": sum(d.mp.spikes for d in dens),
                    "traps": total(lambda d: d.traps)(dens),
                    "over_trained": sum(d.warning == "over-trained" for d in dens),
                    "under_trained": sum(d.warning == "under-trained" for d in dens),
                    "not_fitted": len(dens) - len(fitted),
                    "matrices": len(dens),
                }
        return out

    def rows(self) -> list[dict]:
        return [m.row() for m in self.matrices]

    def title(self) -> str:
        return "Spectral densities of " + ("the weights and of ΔW" if self.base else "the weights")

    def tables(self) -> list[Table]:
        out = [self._table("weights", "W")]
        if self.base is not None:
            out.append(self._table("delta", "ΔW"))
        if self.skipped:
            out.append(
                Table(
                    f"Not analysed: {len(self.skipped)} tensors",
                    ["tensor", "why"],
                    [[s.name, s.reason] for s in self.skipped],
                    names=True,
                    numeric_from=2,
                )
            )
        return out

    def _table(self, part: str, what: str) -> Table:
        ranked = sorted(self.matrices, key=lambda m: (getattr(m, part).alpha is None, getattr(m, part).alpha or 0))
        body = []
        for m in ranked:
            d: SpectralDensity = getattr(m, part)
            fit = d.power_law
            body.append(
                [
                    m.name,
                    m.layer,
                    m.role,
                    None if fit is None else fit.alpha,
                    None if fit is None else fit.ks_distance,
                    None if fit is None else fit.tail,
                    d.alpha_weighted,
                    d.log_spectral_norm,
                    d.log_norm,
                    d.stable_rank,
                    d.mp.spikes,
                    d.mp.soft_rank,
                    d.traps,
                    d.warning,
                ]
            )
        return Table(
            f"ESD of {what}: {len(body)} matrices, smallest α first",
            [
                "tensor",
                "layer",
                "role",
                "α",
                "KS D",
                "tail",
                "α̂",
                "log λmax",
                "log ‖·‖²F",
                "stable rank",
                "spikes",
                "MP soft rank",
                "traps",
                "warning",
            ],
            body,
            "α: power-law exponent of the tail (2–6 is well trained); α̂ = α·log10 λmax; "
            "spikes: eigenvalues beyond the Marchenko–Pastur edge; traps: spikes left after shuffling",
            names=True,
        )

    def lines(self) -> list[str]:
        out = []
        for part, what in (("weights", "W "), ("delta", "ΔW")):
            s = self.summary().get(part)
            if s:
                out.append(
                    f"{what}: mean α {_fmt(s['mean_alpha'])}, mean α̂ {_fmt(s['mean_alpha_weighted'])}, "
                    f"{s['spikes']} spikes, {_traps(s['traps'])}; α < 2 in {s['over_trained']}, "
                    f"α > 6 in {s['under_trained']}, no fit in {s['not_fitted']} of {s['matrices']} matrices"
                )
        if self.skipped:
            out.append(f"{len(self.skipped)} tensors not analysed (listed with the reason)")
        return out

    def headline(self) -> list[tuple[str, str, object]]:
        s = self.summary()
        w = s.get("weights", {})
        return [
            ("esd.matrices", "matrices", s["matrices"]),
            ("esd.mean_alpha", "mean α", w.get("mean_alpha")),
            ("esd.mean_alpha_weighted", "mean α̂", w.get("mean_alpha_weighted")),
            ("esd.traps", "correlation traps", w.get("traps")),
        ]

    def note(self) -> str:
        return "; ".join(self.lines()[:2])

    def problems_found(self) -> list[str]:
        return self.problems


def _traps(count: int | None) -> str:
    return "correlation traps not looked for (--no-traps)" if count is None else f"{count} correlation traps"


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(values)) if values else None


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _flat(d: SpectralDensity) -> dict:
    fit = d.power_law
    return {
        "alpha": d.alpha,
        "xmin": None if fit is None else fit.xmin,
        "ks_distance": None if fit is None else fit.ks_distance,
        "alpha_sigma": None if fit is None else fit.sigma,
        "tail": None if fit is None else fit.tail,
        "alpha_weighted": d.alpha_weighted,
        "log_alpha_norm": d.log_alpha_norm,
        "lambda_max": d.lambda_max,
        "log_norm": d.log_norm,
        "log_spectral_norm": d.log_spectral_norm,
        "stable_rank": d.stable_rank,
        "entropy": d.entropy,
        "num_evals": d.num_evals,
        "nonzero": d.nonzero,
        "mp_variance": d.mp.variance,
        "mp_bulk_max": d.mp.bulk_max,
        "spikes": d.mp.spikes,
        "mp_soft_rank": d.mp.soft_rank,
        "traps": d.traps,
        "rand_lambda_max": d.rand_lambda_max,
        "warning": d.warning,
    }


def summarise_esd(matrices: list[MatrixESD], by: str) -> list[dict]:
    return group_summary(
        matrices,
        {by: lambda m: getattr(m, by)},
        {
            "matrices": len,
            "mean_alpha": mean(lambda m: m.weights.alpha),
            "mean_alpha_weighted": mean(lambda m: m.weights.alpha_weighted),
            "spikes": lambda ms: sum(m.weights.mp.spikes for m in ms),
            "traps": total(lambda m: m.weights.traps),
        },
    )


def _not_analysed(walk: TensorWalk, options: ESDOptions) -> list[Skipped]:
    """Matrices the filters allow but the analysis cannot take, each with the reason."""
    every = select(walk.matching.matched, Selection.of(options, matrices=False, floating=False))
    chosen = {item.names[0] for item in walk.items}
    out = []
    for item in every:
        if item.names[0] in chosen or len(item.shape) < 2 or min(item.shape[0], math.prod(item.shape[1:])) < 2:
            continue  # vectors and [1, n] buffers are not matrices
        if not item.is_float:
            out.append(
                Skipped(
                    item.names[0],
                    f"{item.dtype} entries: not weights (a quantized format weightlab reads decodes to floats)",
                )
            )
    for name in walk.unknown:  # more than two dimensions of no known layout: never read as a matrix
        shape = walk.sources[0].info(name).shape
        out.append(Skipped(name, f"a {len(shape)}-D tensor {list(shape)} of no known layout: not read as a matrix"))
    return out


def esd(
    ckpt: Checkpoint,
    base: Checkpoint | None = None,
    options: ESDOptions = ESDOptions(),
    compute: Compute | None = None,
    on_progress: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> ESDResult:
    """The spectral density of every weight matrix of `ckpt` (and of ΔW = ckpt − base), each
    matrix whole whatever its size: embeddings and heads too."""
    compute = compute or Compute.create()
    walk = TensorWalk(
        [ckpt] if base is None else [ckpt, base], Selection.of(options), changed_by=[ckpt] if base is not None else []
    )

    def work(batch: Batch, compute: Compute) -> list[MatrixESD]:
        out = []
        for b, item in enumerate(batch.items):
            w = batch.tensors[0][b]
            seed = matrix_seed(options.seed, item.names[0])
            entry = MatrixESD(item.names[0], item.layer, item.role, list(w.shape), density(w, options, seed))
            if base is not None:
                entry.delta = density(w - batch.tensors[1][b], options, seed + 1)
            out.append(entry)
        return out

    results = walk.map(work, compute, on_start=on_start, on_progress=on_progress)
    results = walk.in_order(results, lambda m: m.name)
    skipped = _not_analysed(walk, options)
    return ESDResult(
        str(ckpt.path),
        None if base is None else str(base.path),
        options,
        results,
        skipped,
        walk.problems if base is not None else [],
    )
