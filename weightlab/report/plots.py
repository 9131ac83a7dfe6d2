"""PNG plots a person can read at a glance (matplotlib, no display needed)."""

from __future__ import annotations

import math
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from pathlib import Path

import matplotlib

if not os.environ.get("MPLBACKEND") and "matplotlib.pyplot" not in sys.modules:
    matplotlib.use("Agg")  # no display needed; a notebook's own backend (MPLBACKEND) is left as it is
import matplotlib.pyplot as plt
import numpy as np
from scipy import stats

from weightlab.analysis.angles import AnglesResult
from weightlab.analysis.compare import CompareResult
from weightlab.analysis.esd import ESDResult, SpectralDensity
from weightlab.analysis.experts import ExpertBlock, ExpertsResult
from weightlab.analysis.gaussian import LABELS, GaussianResult
from weightlab.analysis.quantization import NOISE_LIKE, QuantErrorResult
from weightlab.analysis.spectrum import MatrixSpectrum, SpectrumResult
from weightlab.analysis.tsd import TSDResult, representative
from weightlab.display import fmt, model_names
from weightlab.report.tables import short_name
from weightlab.surgery.intruders import IntruderReport

ROLE_ORDER = ["q", "k", "v", "qkv", "o", "gate", "gate_up", "up", "down", "embed", "pos_embed", "head", "other"]
STYLE = {
    "figure.dpi": 110,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.titleweight": "bold",
}


def _roles(items) -> list[str]:
    present = {m.role for m in items}
    return [r for r in ROLE_ORDER if r in present] + sorted(present - set(ROLE_ORDER))


def _grid(items: Sequence, value: Callable) -> tuple[np.ndarray, list[int], list[str]]:
    """Mean of `value` per (layer, role) over the items inside the numbered layers (a depth map:
    embeddings and heads, whose change can dwarf every layer's, are left to the tables)."""
    layered = [m for m in items if m.layer is not None]
    layers = sorted({m.layer for m in layered})
    roles = _roles(layered)
    sums = np.zeros((len(layers), len(roles)))
    counts = np.zeros_like(sums)
    for m in layered:
        i, j = layers.index(m.layer), roles.index(m.role)
        sums[i, j] += value(m)
        counts[i, j] += 1
    with np.errstate(invalid="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan), layers, roles


def _heatmap(
    ax,
    grid: np.ndarray,
    layers: list[int],
    roles: list[str],
    title: str,
    cmap: str,
    label: str,
    vmin: float | None = None,
    vmax: float | None = None,
    fmt: str = "{:.2f}",
) -> None:
    shown = np.ma.masked_invalid(grid)
    image = ax.imshow(shown, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_xticks(range(len(roles)), roles)
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_xlabel("module role")
    ax.set_ylabel("layer (depth ↓)")
    ax.set_title(title)
    if grid.size <= 400:
        _annotate(ax, image, grid, fmt, 7)
    plt.colorbar(image, ax=ax, label=label, shrink=0.85)


def _annotate(ax, image, grid: np.ndarray, fmt: str, fontsize: float) -> None:
    """Each finite cell's value, in black or white by the luminance of its colour."""
    for (i, j), v in np.ndenumerate(grid):
        if not math.isnan(v):
            r, g, b, _ = image.cmap(image.norm(v))
            light = 0.299 * r + 0.587 * g + 0.114 * b > 0.5
            ax.text(
                j, i, fmt.format(v), ha="center", va="center", fontsize=fontsize, color="black" if light else "white"
            )


OUTSIDE = "outside\nlayers"  # embeddings, head, pooler: tensors without a layer index


def _depths(items) -> list[int | None]:
    """The layer indices present, in order, and None last when some items sit outside the layers."""
    layers = sorted({m.layer for m in items if m.layer is not None})
    return layers + ([None] if any(m.layer is None for m in items) else [])


def _depth_labels(depths: list[int | None]) -> list[str]:
    return [OUTSIDE if d is None else str(d) for d in depths]


def _say_empty(ax, text: str) -> None:
    """A plot with nothing to draw says why, in the figure itself."""
    ax.text(
        0.5,
        0.5,
        text,
        transform=ax.transAxes,
        ha="center",
        va="center",
        fontsize=9,
        color="#555555",
        bbox=dict(boxstyle="round", fc="#f7f7f7", ec="#dddddd"),
    )


_KEPT: ContextVar[list | None] = ContextVar("kept_figures", default=None)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    kept = _KEPT.get()
    if kept is not None:  # `figures`: the figure itself, for a notebook
        kept.append(fig)
        plt.close(fig)  # closed in pyplot's registry (no double display), still drawable
        return path
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def figures(result: object) -> list:
    """The figures `draw` would save for `result`, as matplotlib figures (nothing written)."""
    kept: list = []
    token = _KEPT.set(kept)
    try:
        with tempfile.TemporaryDirectory() as folder:
            draw(result, Path(folder))
    finally:
        _KEPT.reset(token)
    return kept


def _by_finetune(result: SpectrumResult) -> list[list[MatrixSpectrum]]:
    return [[m for m in result.matrices if m.finetuned == i] for i in range(len(result.finetuned))]


def _ft_label(result: SpectrumResult, i: int) -> str:
    return model_names(result.finetuned)[i]


def spectrum_plots(result: SpectrumResult, out_dir: Path, most_changed: int = 6) -> list[Path]:
    """Singular-value curves of the most-changed matrices, amplification and reorientation
    heatmaps over depth × role, intruder counts per layer."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    groups = _by_finetune(result)
    k = result.options.k
    with plt.rc_context(STYLE):
        if not result.finetuned:  # one checkpoint's own spectra: the matrices with the largest σ₁
            top = sorted(result.matrices, key=lambda m: -m.base.spectral)[:most_changed]
        else:
            top = sorted(result.matrices, key=lambda m: -m.relative_change)[:most_changed]
        if top:
            cols = min(3, len(top))
            rows = math.ceil(len(top) / cols)
            fig, axes = plt.subplots(rows, cols, figsize=(4.8 * cols, 3.3 * rows), squeeze=False)
            for ax, m in zip(axes.flat, top):
                idx = np.arange(1, len(m.sv_base) + 1)
                n = len(m.sv_ft)
                ax.semilogy(idx, m.sv_base, color="#888888", lw=2.2, label="base σ_i")
                several = len(result.finetuned) > 1
                ax.set_title(
                    short_name(m.name) + (f"\n{_ft_label(result, m.finetuned)}" if several else ""), fontsize=8
                )
                ax.set_xlabel("index i")
                ax.set_ylabel("singular value")
                if not n:
                    continue
                ax.semilogy(idx[:n], m.sv_ft, color="#d62728", lw=1.0, label="fine-tuned σ'_i")
                ax.axvline(k + 0.5, color="#444444", ls=":", lw=1)
                ratio = ax.twinx()
                change = 100 * (np.asarray(m.sv_ft) / np.maximum(np.asarray(m.sv_base[:n]), 1e-30) - 1)
                ratio.plot(idx[:n], change, color="#1f77b4", lw=0.8, alpha=0.8, label="σ'_i/σ_i − 1")
                ratio.axhline(0, color="#1f77b4", lw=0.5, alpha=0.4)
                if n > 20:  # the tail of tiny σ can swing wildly; keep the axis on the bulk
                    lo, hi = np.percentile(change, [1, 99])
                    pad = 0.15 * (hi - lo) or 0.01
                    ratio.set_ylim(lo - pad, hi + pad)
                ratio.set_ylabel("σ'/σ − 1 (%)", color="#1f77b4")
                ratio.tick_params(axis="y", colors="#1f77b4")
                ratio.spines["right"].set_visible(True)
                ax.text(
                    0.97,
                    0.95,
                    f"‖ΔW‖/‖W‖ = {fmt(m.relative_change)}\nσ'₁/σ₁ = {fmt(m.amplification[0])}",
                    transform=ax.transAxes,
                    ha="right",
                    va="top",
                    fontsize=7,
                    bbox=dict(boxstyle="round", fc="white", ec="#dddddd", alpha=0.9),
                )
            for ax in axes.flat[len(top) :]:
                ax.axis("off")
            handles = axes.flat[0].get_legend_handles_labels()
            if result.finetuned:
                fig.legend(
                    handles[0] + [plt.Line2D([], [], color="#1f77b4", lw=0.8)],
                    handles[1] + ["σ'_i/σ_i − 1 (right axis)"],
                    loc="lower center",
                    ncol=3,
                    frameon=False,
                    bbox_to_anchor=(0.5, -0.02),
                )
                fig.suptitle(
                    f"Singular values of the {len(top)} most-changed matrices (dotted: top-{k})", fontweight="bold"
                )
            else:
                fig.suptitle(f"Singular values of the {len(top)} matrices with the largest σ₁", fontweight="bold")
            paths.append(_save(fig, out_dir / "spectrum_curves.png"))

        for filename, value, title, cmap, label, diverging, cell_format in [
            (
                "amplification_heatmap.png",
                lambda m: 100 * (m.mean_amplification - 1),
                f"top-{k} amplification: mean σ'_i/σ_i − 1 (%)",
                "RdBu_r",
                "change of σ (%)",
                True,
                "{:+.2f}",
            ),
            (
                "reorientation_heatmap.png",
                lambda m: float(np.degrees(np.arccos(np.clip(m.u_alignment, 0, 1))).mean()),
                f"rotation of the top-{k} left singular vectors: mean ∠(u'_i, u_i)",
                "magma_r",
                "degrees",
                False,
                "{:.1f}",
            ),
        ][: 1 if result.options.values_only else 2]:
            grids = [_grid(g, value) for g in groups]
            if not grids or not any(np.isfinite(g[0]).any() for g in grids):
                continue
            n_roles, n_layers = max(len(g[2]) for g in grids), max(len(g[1]) for g in grids)
            cols = min(2, len(grids))  # side by side at most two: a wide strip would shrink every label
            rows_ = math.ceil(len(grids) / cols)
            fig, axes = plt.subplots(
                rows_, cols, figsize=((2.4 + 0.75 * n_roles) * cols, (1.5 + 0.34 * n_layers) * rows_), squeeze=False
            )
            for ax in axes.flat[len(grids) :]:
                ax.axis("off")
            for i, (ax, (grid, layers, roles)) in enumerate(zip(axes.flat, grids)):
                finite = grid[np.isfinite(grid)]
                top_value = float(np.abs(finite).max()) if finite.size else 1.0
                if diverging:
                    vmin, vmax = -max(top_value, 1e-3), max(top_value, 1e-3)
                else:
                    vmin, vmax = 0.0, max(top_value, 1e-3)
                _heatmap(
                    ax, grid, layers, roles, f"{title}\n{_ft_label(result, i)}", cmap, label, vmin, vmax, cell_format
                )
            paths.append(_save(fig, out_dir / filename))

        depths = _depths(result.matrices)
        if depths and groups and not result.options.values_only:
            fig, ax = plt.subplots(figsize=(max(4.5, 0.45 * len(depths) + 2), 3.2))
            width = 0.8 / len(groups)
            total = 0
            for i, g in enumerate(groups):
                counts = [sum(len(m.intruders) for m in g if m.layer == depth) for depth in depths]
                total += sum(counts)
                bars = ax.bar(
                    np.arange(len(depths)) + i * width - 0.4 + width / 2, counts, width, label=_ft_label(result, i)
                )
                ax.bar_label(bars, labels=[str(c) if c else "" for c in counts], fontsize=6.5)
            ax.set_xticks(range(len(depths)), _depth_labels(depths))
            ax.set_xlabel("layer")
            ax.set_ylabel("intruder dimensions")
            ax.yaxis.get_major_locator().set_params(integer=True)
            ax.set_title(
                f"Intruder dimensions per layer (top {result.options.intruder_k}, ε = {result.options.epsilon:g}): "
                f"{total} in all"
            )
            if total == 0:
                ax.set_ylim(0, 1)
                _say_empty(
                    ax,
                    f"no intruder dimension in any matrix\n(best |cos| ≥ ε = {result.options.epsilon:g} "
                    f"for each of the top {result.options.intruder_k} directions)",
                )
            elif len(groups) > 1:
                ax.legend(fontsize=7, frameon=False)
            paths.append(_save(fig, out_dir / "intruders_per_layer.png"))
    return paths


def angles_plots(result: AnglesResult, out_dir: Path) -> list[Path]:
    """Mean principal angle against depth (one line per role) and a depth × role heatmap."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    what = "task vectors ΔW" if result.base else "weights"
    sides = sorted({m.side for m in result.matrices})
    with plt.rc_context(STYLE):
        layered = [m for m in result.findings() if m.layer is not None and m.angles_deg]
        if layered:
            fig, axes = plt.subplots(1, len(sides), figsize=(5.2 * len(sides), 3.4), squeeze=False)
            for ax, side in zip(axes.flat, sides):
                ms = [m for m in layered if m.side == side]
                for role in _roles(ms):
                    pts = sorted({m.layer for m in ms if m.role == role})
                    ys = [np.mean([m.mean_angle for m in ms if m.role == role and m.layer == layer]) for layer in pts]
                    ax.plot(pts, ys, marker="o", ms=3, label=role)
                ax.set_ylim(0, 90)
                ax.set_xlabel("layer")
                ax.set_ylabel("mean principal angle (°)")
                ax.set_title(f"{side} singular subspaces of {what}, top {result.options.k}")
                ax.axhline(90, color="#bbbbbb", lw=0.8)
                ax.legend(fontsize=7, frameon=False, ncol=2)
            paths.append(_save(fig, out_dir / "angles_vs_depth.png"))
            grids = [(side, *_grid([m for m in layered if m.side == side], lambda m: m.mean_angle)) for side in sides]
            fig, axes = plt.subplots(
                1,
                len(grids),
                figsize=(2 + 0.8 * len(grids[0][3]) * len(grids) + 1.5, 0.9 + 0.32 * len(grids[0][2])),
                squeeze=False,
            )
            for ax, (side, grid, layers, roles) in zip(axes.flat, grids):
                _heatmap(
                    ax, grid, layers, roles, f"mean angle (°), {side}, {what}", "magma_r", "degrees", 0, 90, "{:.0f}"
                )
            paths.append(_save(fig, out_dir / "angles_heatmap.png"))
    return paths


def gaussian_plots(result: GaussianResult, out_dir: Path) -> list[Path]:
    """Histogram with the fitted normal and Q-Q plot for the most and least Gaussian tensors
    (from the sampled entries the analysis kept: a result read back from JSON has none),
    shape-label counts, and std(ΔW) against depth with its fitted line."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    part = result.part
    what = "ΔW = W_ft − W_base" if result.base else "W"
    with plt.rc_context(STYLE):
        extremes = result.extremes()
        if len(extremes) == 2 and all(t.name in result.samples for t in extremes):
            picks = [("most Gaussian", extremes[0]), ("least Gaussian", extremes[1])]
            fig, axes = plt.subplots(2, 2, figsize=(9, 6.4))
            for row, (title, t) in enumerate(picks):
                sample = result.samples[t.name]
                d = getattr(t, part)
                ax = axes[row, 0]
                ax.hist(sample, bins=120, density=True, color="#9ecae1", edgecolor="none")
                grid = np.linspace(sample.min(), sample.max(), 400)
                ax.plot(grid, stats.norm.pdf(grid, d.mean, d.std), color="#d62728", lw=1.2, label="fitted normal")
                ax.set_title(f"{title} {what}: {short_name(t.name, 40)}", fontsize=8)
                ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(5))
                ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 3))
                ax.text(
                    0.02,
                    0.95,
                    f"label: {d.label}\nkurtosis {d.excess_kurtosis:+.2f}\nskew {d.skewness:+.2f}",
                    transform=ax.transAxes,
                    va="top",
                    fontsize=7,
                )
                ax.legend(fontsize=7, frameon=False, loc="upper right")
                (osm, osr), (slope, intercept, r) = stats.probplot(sample, dist="norm", fit=True)
                ax = axes[row, 1]
                ax.plot(osm, osr, ".", ms=1.5, color="#3182bd")
                ax.plot(osm, slope * osm + intercept, color="#d62728", lw=1)
                ax.set_xlabel("normal quantiles")
                ax.set_ylabel("sample quantiles")
                ax.set_title(f"Q-Q plot, R² = {fmt(r * r, 4)}", fontsize=8)
            paths.append(_save(fig, out_dir / "histograms.png"))

        parts = [("weights", "W")] + ([("delta", "ΔW")] if result.base else [])
        fig, ax = plt.subplots(figsize=(6, 3.2))
        width = 0.8 / len(parts)
        for i, (p, label) in enumerate(parts):
            counts = result.label_counts(p)
            bars = ax.bar(
                np.arange(len(LABELS)) + i * width - 0.4 + width / 2, [counts[k] for k in LABELS], width, label=label
            )
            ax.bar_label(bars, fontsize=7)
        ax.set_xticks(range(len(LABELS)), LABELS)
        ax.set_ylabel("tensors")
        ax.set_title("Histogram shape labels")
        ax.legend(fontsize=7, frameon=False)
        paths.append(_save(fig, out_dir / "shape_labels.png"))

        if result.depth_trend is not None:
            trend = result.depth_trend
            fig, ax = plt.subplots(figsize=(6, 3.4))
            layered = [t for t in result.tensors if t.layer is not None and t.delta is not None]
            for role in _roles(layered):
                pts = [t for t in layered if t.role == role]
                ax.scatter([t.layer for t in pts], [t.delta.std for t in pts], s=12, alpha=0.7, label=role)
            xs = np.array([min(trend.layers), max(trend.layers)])
            ax.plot(trend.layers, trend.std, "k-", lw=1, alpha=0.5, label="layer mean")
            ax.plot(
                xs,
                trend.intercept + trend.slope * xs,
                "r--",
                lw=1.2,
                label=f"fit: slope {trend.slope:+.2e}/layer (R² {fmt(trend.r2, 2)}, p {fmt(trend.pvalue, 2)})",
            )
            ax.set_xlabel("layer")
            ax.set_ylabel("std(ΔW)")
            ax.set_title("Does the update's spread grow with depth?")
            ax.legend(fontsize=7, frameon=False, ncol=2)
            paths.append(_save(fig, out_dir / "delta_std_vs_depth.png"))
    return paths


def tsd_plots(result: TSDResult, out_dir: Path) -> list[Path]:
    """δ_i against i for representative matrices (Si et al. 2024, Fig. 2 style) with the chosen
    TSDs marked, and the histogram of TSD positions in the spectrum."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    with plt.rc_context(STYLE):
        picks = representative(result.matrices)
        if picks:
            fig, axes = plt.subplots(1, len(picks), figsize=(3.6 * len(picks), 3.2), squeeze=False)
            for ax, m in zip(axes.flat, picks):
                ax.semilogy(np.arange(len(m.rates)), np.maximum(m.rates, 1e-30), lw=0.8, color="#3182bd")
                shown = [(i, r) for i, r in zip(m.indices, m.rate) if i < len(m.rates)]
                ax.scatter(
                    [i for i, _ in shown],
                    [r for _, r in shown],
                    color="#d62728",
                    s=14,
                    zorder=3,
                    label=f"top {len(m.indices)} TSDs",
                )
                ax.set_xlabel("core direction i (by σ_i, descending)")
                ax.set_ylabel("change rate δ_i")
                ax.set_title(f"layer {m.layer}: {short_name(m.name, 30, drop_layer=True)}", fontsize=8)
                ax.legend(fontsize=7, frameon=False)
            fig.suptitle("δ_i = |u_iᵀ ΔW v_i| / σ_i", fontweight="bold")
            paths.append(_save(fig, out_dir / "change_rates.png"))
        fig, ax = plt.subplots(figsize=(5.5, 3.2))
        counts = result.percentile_histogram()
        ax.bar(np.arange(10) * 10 + 5, counts, width=9, color="#6baed6")
        ax.set_xlabel("position in the base spectrum (percentile; 0 = largest σ)")
        ax.set_ylabel("task-specific directions")
        ax.set_title(f"Where the top-{result.options.top} TSDs sit, over {len(result.matrices)} matrices")
        paths.append(_save(fig, out_dir / "tsd_percentiles.png"))
    return paths


def compare_plots(result: CompareResult, out_dir: Path) -> list[Path]:
    """Pairwise heatmaps (cosine, subspace overlap, sign conflict) in clustering order, and the
    mean pairwise cosine and sign conflict per layer."""
    out_dir.mkdir(parents=True, exist_ok=True)
    order, n = result.order, len(result.finetuned)
    names = result.names()
    labels = [short_name(names[i], 22) for i in order]
    paths = []
    with plt.rc_context(STYLE):
        panels = [
            ("cosine", "cos(τ_a, τ_b)", "RdBu_r", -1.0, 1.0),
            ("subspace_overlap", f"top-{result.options.k} subspace overlap (mean cos²)", "viridis", 0.0, 1.0),
            ("sign_conflict", f"TIES sign conflict (density {result.options.density:g})", "magma_r", 0.0, 0.5),
        ]
        size = 1.2 + 0.42 * n
        fig, axes = plt.subplots(1, 3, figsize=(3 * size + 2.4, size + 0.6), squeeze=False)
        for ax, (key, title, cmap, vmin, vmax) in zip(axes.flat, panels):
            values = getattr(result.overall, key)
            grid = np.array([[np.nan if values[i][j] is None else values[i][j] for j in order] for i in order])
            if np.isfinite(grid).any():
                vmax = max(vmax, float(np.nanmax(grid)))  # a conflict above one half still shows
            image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.set_xticks(range(n), labels, rotation=60, ha="right", fontsize=7)
            ax.set_yticks(range(n), labels, fontsize=7)
            ax.set_title(title)
            if n <= 12:
                _annotate(ax, image, grid, "{:.2f}", 6.5)
            plt.colorbar(image, ax=ax, shrink=0.8)
        fig.suptitle(f"Which of {n} fine-tunes agree (models in clustering order)", fontweight="bold")
        paths.append(_save(fig, out_dir / "compare_heatmaps.png"))

        layers = [layer for layer in result.layers if layer.layer is not None]
        fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * len(layers) + 2.5), 3.2))
        x = [layer.layer for layer in layers]

        def off_diagonal_mean(square) -> float:
            values = [square[i][j] for i in range(n) for j in range(n) if i != j and square[i][j] is not None]
            return float(np.mean(values)) if values else np.nan

        ax.plot(x, [off_diagonal_mean(layer.cosine) for layer in layers], marker="o", label="mean pairwise cosine")
        ax.plot(
            x, [off_diagonal_mean(layer.sign_conflict) for layer in layers], marker="s", label="mean TIES sign conflict"
        )
        ax.axhline(0, color="#888888", lw=0.6)
        ax.set_xlabel("layer")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel("mean over pairs")
        ax.set_title("Agreement of the fine-tunes by depth")
        ax.legend(fontsize=7, frameon=False)
        paths.append(_save(fig, out_dir / "compare_layers.png"))
    return paths


def _esd_panel(ax, d: SpectralDensity, title: str) -> None:
    """One ESD on log-log axes: the density of λ in log-spaced bins, the fitted λ^−α from x_min,
    and the Marchenko–Pastur edge."""
    lam = np.array([v for v in d.eigenvalues if v > 0])
    bins = np.logspace(np.log10(lam.min()), np.log10(lam.max()) + 1e-9, min(60, max(10, len(lam) // 8)))
    hist, edges = np.histogram(lam, bins=bins, density=True)
    centres = np.sqrt(edges[:-1] * edges[1:])
    ax.loglog(centres[hist > 0], hist[hist > 0], "o", ms=3, color="#3182bd", label="ESD")
    fit = d.power_law
    if fit is not None:
        share = fit.tail / len(lam)  # the fit's density is a share of the whole ESD
        x = np.logspace(np.log10(fit.xmin), np.log10(fit.xmax), 50)
        ax.loglog(
            x,
            share * (fit.alpha - 1) / fit.xmin * (x / fit.xmin) ** -fit.alpha,
            color="#d62728",
            lw=1.4,
            label=f"power law α = {fit.alpha:.2f}",
        )
        ax.axvline(fit.xmin, color="#d62728", ls=":", lw=0.9, label="x_min")
    ax.axvline(d.mp.bulk_max, color="#31a354", ls="--", lw=0.9, label=f"MP edge ({d.mp.spikes} spikes)")
    ax.set_xlabel("eigenvalue λ of WᵀW")
    ax.set_ylabel("density")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=6.5, frameon=False)


def esd_plots(result: ESDResult, out_dir: Path) -> list[Path]:
    """α against depth per role (with the 2 and 6 lines of the HTSR reading), and the log-log ESD
    with its power-law fit for the matrices of smallest and largest α."""
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = [("weights", "W")] + ([("delta", "ΔW")] if result.base is not None else [])
    paths = []
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(parts), figsize=(6.0 * len(parts), 3.4), squeeze=False)
        for ax, (part, what) in zip(axes.flat, parts):
            for role in _roles(result.matrices):
                shown = [
                    (m.layer, getattr(m, part).alpha)
                    for m in result.matrices
                    if m.role == role and m.layer is not None and getattr(m, part).alpha is not None
                ]
                if shown:
                    ax.plot(*zip(*shown), marker="o", ms=3, lw=1, label=role)
            for level, text in ((2.0, "α < 2: over-trained"), (6.0, "α > 6: under-trained")):
                ax.axhline(level, color="#888888", ls="--", lw=0.7)
                ax.annotate(
                    text,
                    (0, level),
                    textcoords="offset points",
                    xytext=(2, 2),
                    fontsize=6.5,
                    color="#666666",
                    xycoords=("axes fraction", "data"),
                )
            ax.set_xlabel("layer")
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.set_ylabel("power-law exponent α")
            ax.set_title(f"α of {what} by depth")
            ax.legend(fontsize=7, frameon=False, ncol=2)
        paths.append(_save(fig, out_dir / "esd_alpha.png"))

        picks = []
        for part, what in parts:
            fitted = sorted(
                (m for m in result.matrices if getattr(m, part).alpha is not None and getattr(m, part).eigenvalues),
                key=lambda m: getattr(m, part).alpha,
            )
            if fitted:
                ends = [("smallest", fitted[0]), ("largest", fitted[-1])] if len(fitted) > 1 else [("only", fitted[0])]
                picks += [(getattr(m, part), f"{what}, {which} α: {short_name(m.name, 34)}") for which, m in ends]
        if picks:
            fig, axes = plt.subplots(1, len(picks), figsize=(3.9 * len(picks), 3.3), squeeze=False)
            for ax, (d, title) in zip(axes.flat, picks):
                _esd_panel(ax, d, title)
            fig.suptitle("Empirical spectral densities with their power-law fits", fontweight="bold")
            paths.append(_save(fig, out_dir / "esd_fits.png"))
    return paths


def intruder_plots(result: IntruderReport, out_dir: Path) -> list[Path]:
    """Where the intruders were, per layer and role, and every examined direction's best match
    with the base against the threshold ε."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with plt.rc_context(STYLE):
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.4))
        depths = _depths(result.matrices)
        bottom = np.zeros(len(depths))
        for role in _roles(result.matrices):
            counts = np.array(
                [
                    sum(len(m.intruders) for m in result.matrices if m.layer == depth and m.role == role)
                    for depth in depths
                ],
                dtype=float,
            )
            if counts.any():
                left.bar(range(len(depths)), counts, bottom=bottom, label=role)
                bottom += counts
        left.set_xticks(range(len(depths)), _depth_labels(depths))
        left.set_xlabel("layer")
        left.yaxis.get_major_locator().set_params(integer=True)
        left.set_ylabel(f"intruders scaled by λ = {result.options.scale:g}")
        left.set_title(f"Intruder dimensions per layer: {int(bottom.sum())} in all")
        if bottom.any():
            left.legend(fontsize=7, frameon=False)
        else:
            left.set_ylim(0, 1)
            _say_empty(
                left,
                f"no intruder dimension: nothing was scaled\n(best |cos| ≥ ε = {result.options.epsilon:g} "
                f"for each of the top {result.options.top_k} directions)",
            )
        for m in result.matrices:
            x = np.arange(len(m.best_match_cos))
            right.plot(x, m.best_match_cos, color="#9ecae1", lw=0.6, alpha=0.6)
            if m.intruders:
                right.scatter(m.intruders, [m.best_match_cos[i] for i in m.intruders], color="#d62728", s=12, zorder=3)
        right.axhline(result.options.epsilon, color="#d62728", ls="--", lw=0.8, label=f"ε = {result.options.epsilon:g}")
        right.set_xlabel("singular direction i of W' (by σ'_i)")
        right.set_ylabel("best |cos| with any base direction")
        right.set_ylim(0, 1.02)
        right.set_title("Each direction's best match with the base (red: intruders)")
        right.legend(fontsize=7, frameon=False)
        return [_save(fig, out_dir / "intruders.png")]


def quant_error_plots(result: QuantErrorResult, out_dir: Path) -> list[Path]:
    """Per quantized model: SNR by layer × role, the error's flatness by depth (white noise at 1,
    the noise-like threshold dashed), and the shift of α by depth."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = model_names(result.quantized)
    paths = []
    with plt.rc_context(STYLE):
        for i, name in enumerate(names):
            ms = [m for m in result.matrices if m.quantized == i]
            fig, (heat, flat, alpha) = plt.subplots(1, 3, figsize=(15, 3.6))
            grid, layers, roles = _grid(ms, lambda m: np.nan if m.snr_db is None else m.snr_db)
            if layers and np.isfinite(grid).any():
                _heatmap(
                    heat, grid, layers, roles, f"SNR (dB) of {name}", "viridis", "dB (higher: closer)", fmt="{:.1f}"
                )
            else:
                heat.set_axis_off()
                _say_empty(heat, "no layered matrix has an error:\nSNR not computed (exact copies)")
            flat.axhline(1.0, color="#888888", lw=0.7)
            flat.axhline(NOISE_LIKE, color="#d62728", ls="--", lw=0.8, label=f"noise-like from {NOISE_LIKE}")
            alpha.axhline(0.0, color="#888888", lw=0.7)
            for ax, value, label, title in (
                (flat, lambda m: m.flatness, "flatness of E (1 = white noise)", "Is the error noise-like?"),
                (alpha, lambda m: m.alpha_shift, "Δα (quantized − reference)", "Shift of WeightWatcher's α"),
            ):
                drawn = False
                for role in _roles(ms):
                    shown = [
                        (m.layer, value(m))
                        for m in ms
                        if m.role == role and m.layer is not None and value(m) is not None
                    ]
                    if shown:
                        ax.plot(*zip(*sorted(shown)), marker="o", ms=3, lw=1, label=role)
                        drawn = True
                ax.set_xlabel("layer")
                ax.xaxis.get_major_locator().set_params(integer=True)
                ax.set_ylabel(label)
                ax.set_title(title)
                if drawn:
                    ax.legend(fontsize=7, frameon=False, ncol=2)
                else:
                    _say_empty(ax, "not computed: no layered matrix\nhas an error (or too few eigenvalues)")
            fig.suptitle(f"What quantization did: {name}", fontweight="bold")
            paths.append(
                _save(fig, out_dir / f"quant_error_{i}.png" if len(names) > 1 else out_dir / "quant_error.png")
            )
    return paths


MOST_BLOCKS = 6  # clustered heatmaps drawn: the blocks whose experts are most alike


def experts_plots(result: ExpertsResult, out_dir: Path) -> list[Path]:
    """The expert-to-expert cosine of the blocks whose experts are most alike, in clustering
    order (near copies sit together), and per layer × expert: the router rows' norms and, with
    a base, how far each expert moved."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    if not result.blocks:
        return paths
    shown = sorted(result.blocks, key=lambda b: -(b.mean_cosine() or -2.0))[:MOST_BLOCKS]
    with plt.rc_context(STYLE):
        cols = min(3, len(shown))
        rows = math.ceil(len(shown) / cols)
        n = max(b.experts for b in shown)
        size = min(5.5, 1.6 + 0.3 * n)
        fig, axes = plt.subplots(rows, cols, figsize=(cols * (size + 1.0), rows * size), squeeze=False)
        for ax, b in zip(axes.flat, shown):
            _expert_heatmap(ax, b)
        for ax in list(axes.flat)[len(shown) :]:
            ax.set_axis_off()
        more = (
            f" ({len(shown)} of {len(result.blocks)} blocks: the most alike)" if len(shown) < len(result.blocks) else ""
        )
        fig.suptitle(f"Expert-to-expert cosine, experts in clustering order{more}", fontweight="bold")
        paths.append(_save(fig, out_dir / "experts_cosine.png"))

        panels = [("router row norm ‖r_e‖", lambda b: b.router_norms, "viridis")]
        if result.base is not None:
            panels.append(("moved ‖θ'_e − θ_e‖ / ‖θ_e‖", lambda b: b.moved, "magma_r"))
        fig, axes = plt.subplots(
            1, len(panels), figsize=(6.5 * len(panels), 0.9 + 0.3 * len(result.blocks) + 1.5), squeeze=False
        )
        width = max(b.experts for b in result.blocks)
        for ax, (title, values, cmap) in zip(axes.flat, panels):
            grid = np.full((len(result.blocks), width), np.nan)
            for i, b in enumerate(result.blocks):
                for e, v in enumerate(values(b) or []):
                    grid[i, e] = np.nan if v is None else v
            if np.isfinite(grid).any():
                image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, interpolation="nearest")
                plt.colorbar(image, ax=ax, shrink=0.8)
                if width <= 16 and len(result.blocks) <= 24:
                    _annotate(ax, image, grid, "{:.2f}", 6.5)
            else:
                _say_empty(ax, "not computed: no router row of the experts' count")
            ax.set_yticks(range(len(result.blocks)), [short_name(b.block, 24) for b in result.blocks], fontsize=7)
            ax.set_xlabel("expert")
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.set_title(title)
        fig.suptitle("Per block and expert", fontweight="bold")
        paths.append(_save(fig, out_dir / "experts_router.png"))
    return paths


def _expert_heatmap(ax, b: ExpertBlock) -> None:
    order = b.order
    grid = np.array([[np.nan if b.cosine[i][j] is None else b.cosine[i][j] for j in order] for i in order])
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="RdBu_r", vmin=-1.0, vmax=1.0, interpolation="nearest")
    ticks = range(len(order)) if len(order) <= 32 else range(0, len(order), max(1, len(order) // 16))
    ax.set_xticks(list(ticks), [str(order[t]) for t in ticks], fontsize=7)
    ax.set_yticks(list(ticks), [str(order[t]) for t in ticks], fontsize=7)
    if len(order) <= 12:
        _annotate(ax, image, grid, "{:.2f}", 6.5)
    groups = "; ".join("{" + ", ".join(map(str, g)) + "}" for g in b.near_copies) or "none"
    ax.set_title(f"{short_name(b.block, 28)}\nnear copies: {groups}", fontsize=8)
    ax.set_xlabel("expert")
    ax.set_ylabel("expert")
    plt.colorbar(image, ax=ax, shrink=0.8)


def draw(result: object, out_dir: Path) -> list[Path]:
    """The plots of any result, chosen by its type; none for a type without plots."""
    plotter = PLOTTERS.get(type(result))
    return plotter(result, out_dir) if plotter is not None else []


PLOTTERS: dict[type, Callable[..., list[Path]]] = {
    SpectrumResult: spectrum_plots,
    AnglesResult: angles_plots,
    GaussianResult: gaussian_plots,
    TSDResult: tsd_plots,
    CompareResult: compare_plots,
    ESDResult: esd_plots,
    IntruderReport: intruder_plots,
    QuantErrorResult: quant_error_plots,
    ExpertsResult: experts_plots,
}
