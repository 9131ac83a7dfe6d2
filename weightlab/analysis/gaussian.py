"""`weightlab gaussian`: how Gaussian are the weights, and the fine-tuning update?

Si, Jiang, Shen 2025, "Unveiling the Mystery of Weight in Large Foundation Models: Gaussian
Distribution Never Fades": weights are mostly Gaussian, with occasional sharp, inverted-T or
linear histograms; the transformation weights ΔW = W_ft − W_base behave like Gaussian noise
whose standard deviation grows with depth.

Moments use every entry (on the compute device, float64); tests that need a sample use a
seeded uniform sample (with replacement) of `sample_size` entries (all, when fewer):
- Kolmogorov–Smirnov against N(mean, std) (Massey 1951), Anderson–Darling (Stephens 1974),
  D'Agostino–Pearson K² (D'Agostino & Pearson 1973), and the Q-Q correlation R² of the
  normal probability plot (Filliben 1975) — all through `scipy.stats`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from scipy import stats

from weightlab.analysis.summary import group_summary, mean
from weightlab.compute.device import Compute
from weightlab.compute.walk import Batch, Selection, TensorWalk
from weightlab.display import fmt
from weightlab.io.checkpoint import Checkpoint
from weightlab.options import GaussianOptions
from weightlab.results import Result, Table

# Shape-label thresholds, chosen between the values of synthetic references (docs/gaussian.md
# lists them: `reference_table()` recomputes them). Excess kurtosis: Gaussian 0, Laplace 3,
# logistic 1.2, uniform −1.2, triangular −0.6; mass within 0.01σ of zero: Gaussian 0.008,
# Laplace 0.014, spike-and-slab with 20% zeros ≥ 0.2.
SPIKE_AT_ZERO = 0.10  # fraction |x| < 0.01σ above which the histogram has a spike at zero
SHARP_KURTOSIS = 0.6  # excess kurtosis above which the centre is sharp (leptokurtic)
FLAT_KURTOSIS = -0.4  # excess kurtosis below which the histogram is flat (uniform/triangular-like)
MAX_ABS_SKEW = 0.5  # a Gaussian label also needs a symmetric histogram
LOPSIDED_SKEW = 1.0  # beyond this |skewness| no symmetric shape fits (lognormal: 1.8)
LABELS = ("gaussian", "sharp", "inverted-T", "linear", "other")


@dataclass
class Distribution:
    """Statistics of one tensor's entries."""

    numel: int
    mean: float
    std: float
    skewness: float  # m3 / m2^1.5 (population moments, as scipy.stats.skew)
    excess_kurtosis: float  # m4 / m2² − 3 (as scipy.stats.kurtosis)
    beyond_3sigma: float  # fraction |x − mean| > 3 std (Gaussian: 0.0027)
    beyond_6sigma: float  # (Gaussian: 2e-9)
    near_zero: float  # fraction |x| < 0.01 std (Gaussian with mean 0: 0.008)
    ks_statistic: float
    ks_pvalue: float
    anderson_darling: float
    k2_pvalue: float
    qq_r2: float
    sample_size: int
    label: str


def label_shape(excess_kurtosis: float, skewness: float, near_zero: float) -> str:
    """gaussian / sharp / inverted-T / linear / other, from the thresholds above, in this order:
    a spike at zero, a lopsided histogram, a sharp centre, a flat top, a symmetric normal."""
    if near_zero >= SPIKE_AT_ZERO:
        return "inverted-T"
    if abs(skewness) > LOPSIDED_SKEW:
        return "other"
    if excess_kurtosis >= SHARP_KURTOSIS:
        return "sharp"
    if excess_kurtosis <= FLAT_KURTOSIS:
        return "linear"
    if abs(skewness) <= MAX_ABS_SKEW:
        return "gaussian"
    return "other"


def sample_entries(x: torch.Tensor, size: int, seed: int) -> np.ndarray:
    """A seeded uniform sample of `size` entries, drawn with replacement (O(size) memory and
    time, where a permutation of a 30M-entry embedding would cost O(n)); the whole tensor when
    it has at most `size` entries."""
    flat = x.reshape(-1)
    if flat.numel() <= size:
        return flat.double().cpu().numpy()
    gen = torch.Generator().manual_seed(seed)
    index = torch.randint(flat.numel(), (size,), generator=gen).sort().values.to(flat.device)
    return flat[index].double().cpu().numpy()


def anderson_darling(sample: np.ndarray) -> float:
    """The Anderson–Darling statistic against a fitted normal (scipy; quiet across versions)."""
    try:
        return float(stats.anderson(sample, "norm", method="interpolate").statistic)
    except TypeError:  # scipy < 1.17 has no `method`
        return float(stats.anderson(sample, "norm").statistic)


CHUNK = (
    1 << 16
)  # entries per pass of the streamed moments: 512 KB of float64, under the mmap threshold (compute/memory.py)


def _moments(x: torch.Tensor) -> tuple[float, float, float, float, float, float, float]:
    """mean, central m2, m3, m4 and the fractions beyond 3σ and 6σ and within 0.01σ of zero,
    accumulated in float64 over chunks (two passes: the mean first, then the rest)."""
    x = x.reshape(-1)
    n = x.numel()
    mean = sum(float(x[i : i + CHUNK].double().sum()) for i in range(0, n, CHUNK)) / n
    s2 = s3 = s4 = 0.0
    for i in range(0, n, CHUNK):
        d = x[i : i + CHUNK].double() - mean
        d2 = d * d
        s2, s3, s4 = s2 + float(d2.sum()), s3 + float((d2 * d).sum()), s4 + float((d2 * d2).sum())
    m2 = s2 / n
    std = m2**0.5
    beyond3 = beyond6 = near = 0
    for i in range(0, n, CHUNK):
        chunk = x[i : i + CHUNK].double()
        deviation = (chunk - mean).abs()
        beyond3 += int(torch.count_nonzero(deviation > 3 * std))
        beyond6 += int(torch.count_nonzero(deviation > 6 * std))
        near += int(torch.count_nonzero(chunk.abs() < 0.01 * std))
    return mean, m2, s3 / n, s4 / n, beyond3 / n, beyond6 / n, near / n


def describe(x: torch.Tensor, sample_size: int = 100_000, seed: int = 0) -> Distribution:
    """Moments of all entries (float64, streamed) and normality tests on a seeded sample."""
    x = x.reshape(-1)
    n = x.numel()
    mean, m2, m3, m4, beyond3, beyond6, near_zero = _moments(x)
    s = m2**0.5
    skew = m3 / m2**1.5 if m2 > 0 else 0.0  # a constant tensor has no shape to speak of
    kurt = m4 / m2**2 - 3 if m2 > 0 else 0.0
    sample = sample_entries(x, sample_size, seed)
    if s > 0:
        ks = stats.kstest(sample, "norm", args=(mean, s))
        ad = anderson_darling(sample)
        k2 = float(stats.normaltest(sample).pvalue) if sample.size >= 20 else float("nan")
        r = stats.probplot(sample, dist="norm", fit=True)[1][2]
        ks_stat, ks_p, qq = float(ks.statistic), float(ks.pvalue), float(r * r)
    else:  # a constant tensor: nothing Gaussian about it
        ks_stat, ks_p, ad, k2, qq = 1.0, 0.0, float("inf"), 0.0, 0.0
    label = label_shape(kurt, skew, near_zero) if s > 0 else "other"
    return Distribution(
        n, mean, s, skew, kurt, beyond3, beyond6, near_zero, ks_stat, ks_p, ad, k2, qq, int(sample.size), label
    )


@dataclass
class TensorGaussianity:
    name: str
    layer: int | None
    role: str
    weights: Distribution
    delta: Distribution | None = None  # ΔW = W_ft − W_base, with --base
    std_ratio: float | None = None  # std(W_ft) / std(W_base)
    delta_weight_correlation: float | None = None  # Pearson corr(ΔW, W_base) over entries

    def row(self) -> dict:
        out = {
            "name": self.name,
            "layer": self.layer,
            "role": self.role,
            **{f"w_{k}": v for k, v in asdict(self.weights).items()},
        }
        if self.delta is not None:
            out.update({f"dw_{k}": v for k, v in asdict(self.delta).items()})
            out.update(std_ratio=self.std_ratio, delta_weight_correlation=self.delta_weight_correlation)
        return out


@dataclass
class DepthTrend:
    """std(ΔW) against layer depth: least-squares line over the per-layer mean std."""

    layers: list[int]
    std: list[float]
    slope: float
    intercept: float
    r2: float
    pvalue: float

    @property
    def grows_with_depth(self) -> bool:
        return self.slope > 0 and self.pvalue < 0.05


@dataclass
class GaussianResult(Result):
    SCHEMA = "weightlab.gaussian/1"
    REFERENCE = "Si, Jiang, Shen 2025, Gaussian Distribution Never Fades"
    ORDER = 30

    checkpoint: str
    base: str | None
    options: GaussianOptions
    tensors: list[TensorGaussianity]
    depth_trend: DepthTrend | None = None
    problems: list[str] = field(default_factory=list)
    # sampled entries of the most and least Gaussian tensors, for the histograms (not in the JSON:
    # a result read back from a file has none, and its report shows no histogram)
    samples: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    @property
    def part(self) -> str:
        """What the tables rank: the update ΔW with a base, else the weights."""
        return "delta" if self.base else "weights"

    def varying(self, part: str | None = None) -> list[TensorGaussianity]:
        """The tensors whose `part` has a distribution to speak of (its entries are not all equal)."""
        part = part or self.part
        return [t for t in self.tensors if getattr(t, part) is not None and getattr(t, part).std > 0]

    def constant(self, part: str | None = None) -> list[TensorGaussianity]:
        """The tensors whose `part` is one value repeated: for ΔW, the tensors the fine-tune did not
        change (listed as unchanged, never ranked nor drawn as a distribution)."""
        part = part or self.part
        return [t for t in self.tensors if getattr(t, part) is not None and not getattr(t, part).std > 0]

    def extremes(self) -> list[TensorGaussianity]:
        """The most and the least Gaussian tensor (by Q-Q R² of what this result is about), among
        those that have a distribution (`varying`)."""
        ranked = sorted(self.varying(), key=lambda t: getattr(t, self.part).qq_r2)
        return [ranked[-1], ranked[0]] if len(ranked) > 1 else ranked

    def label_counts(self, part: str | None = None) -> dict[str, int]:
        """Shape labels of `part` ("weights" or "delta"; default: what this result is about, `part`),
        over the tensors that have a distribution (`varying`)."""
        counts = dict.fromkeys(LABELS, 0)
        for t in self.varying(part):
            counts[getattr(t, part or self.part).label] += 1
        return counts

    def to_dict(self) -> dict:
        trend = None
        if self.depth_trend is not None:
            trend = {**asdict(self.depth_trend), "grows_with_depth": self.depth_trend.grows_with_depth}
        return {
            "schema": self.SCHEMA,
            "checkpoint": self.checkpoint,
            "base": self.base,
            "options": asdict(self.options),
            "problems": self.problems,
            "label_counts": self.label_counts("weights"),
            "delta_label_counts": self.label_counts("delta") if self.base else None,
            "depth_trend": trend,
            "summary_by_layer": summarise_gaussian(self.tensors, "layer"),
            "summary_by_role": summarise_gaussian(self.tensors, "role"),
            "tensors": [asdict(t) for t in self.tensors],
        }

    def rows(self) -> list[dict]:
        return [t.row() for t in self.tensors]

    def title(self) -> str:
        return "Gaussianity of " + ("the update ΔW" if self.base else "the weights")

    def tables(self) -> list[Table]:
        delta = self.base is not None
        body = []
        for t in sorted(self.varying(), key=lambda t: getattr(t, self.part).qq_r2):
            d = getattr(t, self.part)
            body.append(
                [
                    t.name,
                    t.layer,
                    t.role,
                    d.label,
                    d.std,
                    d.skewness,
                    d.excess_kurtosis,
                    d.beyond_3sigma,
                    d.near_zero,
                    d.ks_statistic,
                    d.anderson_darling,
                    d.qq_r2,
                    *([t.std_ratio, t.delta_weight_correlation] if delta else []),
                ]
            )
        what = "ΔW" if delta else "weights"
        constant = self.constant()
        same = (
            [
                Table(
                    f"{'unchanged (ΔW = 0)' if delta else 'constant'}: {len(constant)} tensors, not ranked",
                    ["tensor", "layer", "role", "entries"],
                    [[t.name, t.layer, t.role, getattr(t, self.part).numel] for t in constant],
                    names=True,
                )
            ]
            if constant
            else []
        )
        return [
            Table(
                f"Gaussianity of {what}: {len(self.varying())} tensors, least Gaussian first",
                [
                    "tensor",
                    "layer",
                    "role",
                    "label",
                    "std",
                    "skew",
                    "ex.kurt",
                    ">3σ",
                    "≈0",
                    "KS",
                    "AD",
                    "Q-Q R²",
                    *(["std W'/W", "corr(ΔW,W)"] if delta else []),
                ],
                body,
                "≈0: fraction |x| < 0.01σ; >3σ: Gaussian 0.0027"
                + (f"; {len(constant)} {'unchanged' if delta else 'constant'} tensors apart" if constant else ""),
                names=True,
            ),
            *same,
        ]

    def lines(self) -> list[str]:
        out = ["weights: " + ", ".join(f"{k} {v}" for k, v in self.label_counts("weights").items())]
        if self.base:
            out.append("ΔW:      " + ", ".join(f"{k} {v}" for k, v in self.label_counts("delta").items()))
        constant = self.constant()
        if constant:
            kind = "unchanged by the fine-tune (ΔW = 0)" if self.base else "constant (every entry equal)"
            names = ", ".join(t.name for t in constant[:5]) + (", …" if len(constant) > 5 else "")
            out.append(f"{len(constant)} tensors {kind}, not ranked: {names}")
        if self.depth_trend is not None:
            t = self.depth_trend
            verdict = (
                "grows" if t.grows_with_depth else ("shrinks" if t.slope < 0 and t.pvalue < 0.05 else "no clear trend")
            )
            out.append(
                f"std(ΔW) vs depth: slope {t.slope:+.3e} per layer (R² {fmt(t.r2, 2)}, p {fmt(t.pvalue, 2)}): {verdict}"
            )
        return out

    def headline(self) -> list[tuple[str, str, object]]:
        n = len(self.varying())
        what = "ΔW" if self.base else "weights"
        out = [
            ("gaussian.tensors", "tensors tested", n),
            *(
                [("gaussian.unchanged", "unchanged (ΔW = 0)" if self.base else "constant", len(self.constant()))]
                if self.constant()
                else []
            ),
            (
                "gaussian.gaussian_share",
                f"share of {what} labelled gaussian",
                self.label_counts()["gaussian"] / n if n else None,
            ),
        ]
        if self.depth_trend is not None:
            out.append(("gaussian.delta_std_slope", "std(ΔW) slope per layer", self.depth_trend.slope))
        return out

    def note(self) -> str:
        return f"Labels of {'ΔW' if self.base else 'the weights'}: " + ", ".join(
            f"{k} {v}" for k, v in self.label_counts().items()
        )


def summarise_gaussian(tensors: Sequence[TensorGaussianity], by: str) -> list[dict]:
    rows = group_summary(
        tensors,
        {by: lambda t: getattr(t, by)},
        {
            "tensors": len,
            "mean_excess_kurtosis": mean(lambda t: t.weights.excess_kurtosis),
            "mean_qq_r2": mean(lambda t: t.weights.qq_r2),
            "gaussian_share": mean(lambda t: float(t.weights.label == "gaussian")),
        },
    )
    if any(t.delta is not None for t in tensors):
        deltas = group_summary(
            [t for t in tensors if t.delta is not None],
            {by: lambda t: getattr(t, by)},
            {"mean_delta_std": mean(lambda t: t.delta.std), "mean_delta_qq_r2": mean(lambda t: t.delta.qq_r2)},
        )
        by_key = {row[by]: row for row in deltas}
        for row in rows:
            row.update({k: v for k, v in by_key.get(row[by], {}).items() if k != by})
    return rows


def depth_trend(tensors: Sequence[TensorGaussianity]) -> DepthTrend | None:
    """Fit std(ΔW) = a + b·layer over the per-layer means (needs at least three layers)."""
    per_layer: dict[int, list[float]] = {}
    for t in tensors:
        if t.delta is not None and t.layer is not None:
            per_layer.setdefault(t.layer, []).append(t.delta.std)
    if len(per_layer) < 3:
        return None
    layers = sorted(per_layer)
    std = [float(np.mean(per_layer[layer])) for layer in layers]
    fit = stats.linregress(layers, std)
    return DepthTrend(layers, std, float(fit.slope), float(fit.intercept), float(fit.rvalue**2), float(fit.pvalue))


def gaussian(
    ckpt: Checkpoint,
    base: Checkpoint | None = None,
    options: GaussianOptions = GaussianOptions(),
    compute: Compute | None = None,
    on_progress: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> GaussianResult:
    """Distribution statistics of every floating tensor of `ckpt` (and of ΔW = ckpt − base)."""
    compute = compute or Compute.create()
    selection = Selection.of(options, matrices=False, min_elements=options.min_elements)
    walk = TensorWalk(
        [ckpt] if base is None else [ckpt, base], selection, changed_by=[ckpt] if base is not None else []
    )

    def work(batch: Batch, compute: Compute) -> list[TensorGaussianity]:
        out = []
        for b, item in enumerate(batch.items):
            w = batch.tensors[0][b]
            entry = TensorGaussianity(
                item.names[0], item.layer, item.role, describe(w, options.sample_size, options.seed)
            )
            if base is not None:
                w0 = batch.tensors[1][b]
                delta = w - w0
                entry.delta = describe(delta, options.sample_size, options.seed)
                base_std = _moments(w0)[1] ** 0.5
                entry.std_ratio = entry.weights.std / base_std if base_std > 0 else float("nan")
                entry.delta_weight_correlation = _correlation(delta, w0)
            out.append(entry)
        return out

    results = walk.map(work, compute, stored_layout=True, on_start=on_start, on_progress=on_progress)
    results = walk.in_order(results, lambda t: t.name)
    trend = depth_trend(results) if base is not None else None
    result = GaussianResult(
        str(ckpt.path),
        None if base is None else str(base.path),
        options,
        results,
        trend,
        walk.problems if base is not None else [],
    )
    for tensor in result.extremes():
        x = ckpt.get(tensor.name, dtype=torch.float64)
        result.samples[tensor.name] = sample_entries(
            x - base.get(tensor.name, dtype=torch.float64) if base else x, options.sample_size, options.seed
        )
    return result


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two tensors' entries, accumulated in float64 over chunks."""
    a, b = a.reshape(-1), b.reshape(-1)
    n = a.numel()
    sa = sb = sab = saa = sbb = 0.0
    for i in range(0, n, CHUNK):
        x, y = a[i : i + CHUNK].double(), b[i : i + CHUNK].double()
        sa, sb = sa + float(x.sum()), sb + float(y.sum())
        sab, saa, sbb = sab + float(x @ y), saa + float(x @ x), sbb + float(y @ y)
    cov = sab - sa * sb / n
    var = (saa - sa * sa / n) * (sbb - sb * sb / n)
    return cov / var**0.5 if var > 0 else float("nan")


def reference_table(n: int = 200_000, seed: int = 0) -> dict[str, dict[str, float]]:
    """Statistics and labels of the synthetic references the thresholds were chosen from."""
    gen = torch.Generator().manual_seed(seed)
    normal = torch.randn(n, generator=gen, dtype=torch.float64)
    uniform = torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1
    references = {
        "gaussian": normal,
        "laplace": -uniform.sign() * torch.log1p(-uniform.abs()),
        "logistic": torch.log(uniform.abs().clamp_min(1e-12) / (1 - uniform.abs()).clamp_min(1e-12)),
        "uniform": uniform,
        "triangular": uniform + (torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1),
        "spike-and-slab (20% zeros, uniform slab)": torch.where(torch.rand(n, generator=gen) < 0.2, 0.0, uniform),
        "student-t (5 dof)": normal / (torch.randn(5, n, generator=gen, dtype=torch.float64).pow(2).mean(0)).sqrt(),
        "gaussian + 1% outliers ×8": torch.where(torch.rand(n, generator=gen) < 0.01, 8 * normal, normal),
        "skewed (lognormal)": torch.exp(0.5 * normal),
    }
    table = {}
    for name, x in references.items():
        d = describe(x, 20_000, seed)
        table[name] = {
            "excess_kurtosis": d.excess_kurtosis,
            "skewness": d.skewness,
            "near_zero": d.near_zero,
            "qq_r2": d.qq_r2,
            "label": d.label,
        }
    return table
