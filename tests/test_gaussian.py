"""`gaussian`: labels of synthetic references, statistics equal scipy's, depth trends recovered."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.stats as st
import torch
from safetensors.torch import save_file

import weightlab as wl
from weightlab.analysis.gaussian import GaussianOptions, describe, gaussian, label_shape, reference_table
from weightlab.io import open_checkpoint, open_finetuned

N = 60_000


def synthetic(kind: str, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(N, generator=gen, dtype=torch.float64) * 2 - 1
    if kind == "gaussian":
        return 0.02 * torch.randn(N, generator=gen, dtype=torch.float64)
    if kind == "laplace":
        return -0.02 * u.sign() * torch.log1p(-u.abs())
    if kind == "uniform":
        return 0.05 * u
    if kind == "spike-and-slab":
        return torch.where(torch.rand(N, generator=gen) < 0.4, torch.zeros(()), 0.05 * u)
    raise ValueError(kind)


@pytest.mark.parametrize(
    "kind, label",
    [("gaussian", "gaussian"), ("laplace", "sharp"), ("uniform", "linear"), ("spike-and-slab", "inverted-T")],
)
def test_synthetic_references_get_the_right_label(kind, label):
    assert describe(synthetic(kind)).label == label


def test_reference_table_labels_match_what_the_thresholds_were_chosen_for():
    table = reference_table(n=50_000)
    assert table["gaussian"]["label"] == "gaussian"
    assert table["laplace"]["label"] == "sharp" and table["logistic"]["label"] == "sharp"
    assert table["uniform"]["label"] == "linear" and table["triangular"]["label"] == "linear"
    assert table["spike-and-slab (20% zeros, uniform slab)"]["label"] == "inverted-T"
    assert table["skewed (lognormal)"]["label"] == "other"
    assert table["student-t (5 dof)"]["label"] == "sharp"


def test_statistics_equal_scipy_on_the_same_data():
    x = synthetic("laplace", seed=3)
    d = describe(x, sample_size=N)  # sample = every entry, so the tests see exactly x
    a = x.numpy()
    assert d.mean == pytest.approx(a.mean()) and d.std == pytest.approx(a.std())
    assert d.skewness == pytest.approx(st.skew(a), rel=1e-9, abs=1e-12)
    assert d.excess_kurtosis == pytest.approx(st.kurtosis(a), rel=1e-9)
    ks = st.kstest(a, "norm", args=(a.mean(), a.std()))
    assert (d.ks_statistic, d.ks_pvalue) == pytest.approx((ks.statistic, ks.pvalue))
    assert d.anderson_darling == pytest.approx(st.anderson(a, "norm").statistic)
    assert d.k2_pvalue == pytest.approx(st.normaltest(a).pvalue)
    r = st.probplot(a, dist="norm", fit=True)[1][2]
    assert d.qq_r2 == pytest.approx(r * r)
    assert d.beyond_3sigma == pytest.approx(np.mean(np.abs(a - a.mean()) > 3 * a.std()))


def test_sample_is_seeded_and_documented_size():
    x = torch.randn(300_000, generator=torch.Generator().manual_seed(0))
    a, b = describe(x, 50_000, seed=4), describe(x, 50_000, seed=4)
    assert a == b and a.sample_size == 50_000 and a.numel == 300_000


def test_label_rules_order():
    assert label_shape(3.0, 0.0, 0.5) == "inverted-T"
    assert label_shape(3.0, 0.0, 0.01) == "sharp"
    assert label_shape(-1.2, 0.0, 0.01) == "linear"
    assert label_shape(0.1, 0.1, 0.01) == "gaussian"
    assert label_shape(0.1, 1.5, 0.01) == "other"


def _layered(tmp_path, name: str, stds) -> None:
    gen = torch.Generator().manual_seed(1)
    base = {f"layers.{i}.mlp.up_proj.weight": 0.02 * torch.randn(64, 96, generator=gen) for i in range(len(stds))}
    save_file(base, tmp_path / "base.safetensors")
    ft = {n: w + s * torch.randn(64, 96, generator=gen) for (n, w), s in zip(base.items(), stds)}
    save_file(ft, tmp_path / f"{name}.safetensors")


def test_delta_std_growing_linearly_with_depth_gives_a_positive_slope(tmp_path):
    stds = [1e-3 * (1 + i) for i in range(8)]
    _layered(tmp_path, "growing", stds)
    result = gaussian(open_checkpoint(tmp_path / "growing.safetensors"), open_checkpoint(tmp_path / "base.safetensors"))
    trend = result.depth_trend
    assert trend.grows_with_depth and trend.slope == pytest.approx(1e-3, rel=0.05) and trend.r2 > 0.99
    assert all(t.delta.label == "gaussian" for t in result.tensors)
    assert all(abs(t.delta_weight_correlation) < 0.05 for t in result.tensors)  # noise-like
    assert all(t.std_ratio > 1 for t in result.tensors)


def test_constant_delta_std_gives_about_zero_slope(tmp_path):
    _layered(tmp_path, "flat", [2e-3] * 8)
    result = gaussian(open_checkpoint(tmp_path / "flat.safetensors"), open_checkpoint(tmp_path / "base.safetensors"))
    assert abs(result.depth_trend.slope) < 2e-5 and not result.depth_trend.grows_with_depth


def test_adapter_update_is_tested_on_its_modules_only(zoo, adapters):
    base = open_checkpoint(zoo["llama"])
    result = gaussian(open_finetuned(adapters["llama"], base), base, GaussianOptions(min_elements=256))
    assert {t.name for t in result.tensors} == {
        f"layers.{i}.{m}.weight" for i in (0, 1) for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
    }
    assert all(t.delta.std > 0 for t in result.tensors)


def test_gaussian_cli_on_a_real_finetune_writes_everything(zoo, run_cli, tmp_path):
    code, out, err = run_cli(
        "gaussian",
        zoo["bert_ft"],
        "--base",
        zoo["bert"],
        "--min-elements",
        "512",
        "--json",
        tmp_path / "g.json",
        "--csv",
        tmp_path / "g.csv",
        "--plots",
        tmp_path / "plots",
    )
    assert code == 0, err
    data = json.loads((tmp_path / "g.json").read_text())
    assert data["schema"] == "weightlab.gaussian/1" and data["tensors"]
    assert sum(data["label_counts"].values()) == len(data["tensors"])
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        ".weightlab-output",
        "histograms.png",
        "shape_labels.png",
    ]
    assert "Gaussianity of ΔW" in out


def test_a_tensor_the_fine_tune_never_changed_is_listed_as_unchanged_never_ranked(tmp_path, run_cli):
    """ΔW = 0 (a pooler the task never trained) has no distribution: it is counted and named as
    unchanged, and no table, card, plot title or line ranks it or shows NaN for it."""
    from conftest import shown_nan

    g = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.mlp.up_proj.weight": torch.randn(64, 32, generator=g) for i in range(3)}
    base["pooler.dense.weight"] = torch.randn(32, 32, generator=g)
    ft = {k: v + (0 if k.startswith("pooler") else 0.01 * torch.randn(v.shape, generator=g)) for k, v in base.items()}
    for name, tensors in (("base", base), ("ft", ft)):
        (tmp_path / name).mkdir()
        save_file(tensors, tmp_path / name / "model.safetensors")
    result = wl.gaussian(tmp_path / "ft", tmp_path / "base", min_elements=16)
    assert [t.name for t in result.constant()] == ["pooler.dense.weight"]
    assert "pooler.dense.weight" not in [t.name for t in result.extremes()]
    main, unchanged = result.tables()
    assert "pooler.dense.weight" not in [row[0] for row in main.rows]
    assert [row[0] for row in unchanged.rows] == ["pooler.dense.weight"] and "unchanged" in unchanged.title
    assert sum(result.label_counts("delta").values()) == 3
    assert any("1 tensors unchanged by the fine-tune" in line for line in result.lines())
    report = tmp_path / "g.html"
    code, _, err = run_cli(
        "gaussian", tmp_path / "ft", "--base", tmp_path / "base", "--min-elements", "16", "--report", report
    )
    assert code == 0, err
    assert not shown_nan(report.read_text())
