"""`weightlab esd`: the power-law fit against a plain loop of WeightWatcher's formula and a
planted Pareto tail, Marchenko–Pastur spikes and correlation traps planted in random matrices."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from weightlab.analysis.esd import ESDOptions, density, esd, fit_power_law, marchenko_pastur, mp_median
from weightlab.io import open_finetuned, open_weights


def _fit_by_loop(evals: np.ndarray) -> tuple[float, float, float]:
    """WeightWatcher's WWFit.fit_power_law_standard, written out as a loop (its code, not ours)."""
    data = np.sort(evals)
    logs = np.log(data)
    best = (np.inf, None, None)
    for i, xmin in enumerate(data[:-1]):
        n = len(data) - i
        alpha = 1 + n / (np.sum(logs[i:]) - n * logs[i])
        d = np.max(np.abs(1 - (data[i:] / xmin) ** (-alpha + 1) - np.arange(n) / n)) if alpha > 1 else 1.0
        if d < best[0]:
            best = (d, alpha, xmin)
    return best[1], best[2], best[0]


def _pareto(alpha: float, n: int, seed: int) -> np.ndarray:
    u = np.random.default_rng(seed).random(n)
    return (1 - u) ** (-1 / (alpha - 1))  # p(x) ∝ x^-alpha on [1, ∞)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_power_law_fit_equals_weightwatchers_loop(seed):
    rng = np.random.default_rng(seed)
    evals = np.concatenate([rng.gamma(2.0, 1.0, 600), _pareto(3.0, 150, seed) * 8])
    fit = fit_power_law(evals)
    alpha, xmin, d = _fit_by_loop(evals)
    assert fit.alpha == pytest.approx(alpha, rel=1e-12)
    assert fit.xmin == xmin and fit.ks_distance == pytest.approx(d, rel=1e-12)
    assert fit.tail == int(np.count_nonzero(evals >= xmin))
    assert fit.sigma == pytest.approx((alpha - 1) / math.sqrt(fit.tail))


def test_a_planted_pareto_tail_gives_back_its_exponent():
    for alpha in (2.0, 3.5, 5.0):
        fit = fit_power_law(_pareto(alpha, 4000, seed=7))
        assert fit.alpha == pytest.approx(alpha, abs=4 * fit.sigma + 0.05)


def test_mp_median_matches_simulated_random_matrices():
    rng = np.random.default_rng(0)
    for n, m in ((2000, 1000), (1200, 1200), (4000, 400)):
        w = rng.standard_normal((n, m))
        assert np.median(np.linalg.eigvalsh(w.T @ w / n)) == pytest.approx(mp_median(m / n), rel=0.01)


def test_a_random_matrix_has_no_spikes_and_planted_ones_are_counted():
    gen = torch.Generator().manual_seed(0)
    n, m = 600, 300
    w = torch.randn(n, m, generator=gen, dtype=torch.float64) * 0.02
    lam = np.linalg.eigvalsh((w.T @ w).numpy())
    mp = marchenko_pastur(lam, n, m)
    assert mp.spikes == 0
    assert mp.variance == pytest.approx(0.02**2, rel=0.02)
    assert mp.bulk_max == pytest.approx(0.02**2 * (math.sqrt(n) + math.sqrt(m)) ** 2, rel=0.03)
    assert mp.soft_rank == pytest.approx(1.0, abs=0.05)
    u, _ = torch.linalg.qr(torch.randn(n, 3, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(m, 3, generator=gen, dtype=torch.float64))
    spiked = w + u @ torch.diag(torch.tensor([3.0, 2.0, 1.5], dtype=torch.float64)) @ v.T
    lam = np.linalg.eigvalsh((spiked.T @ spiked).numpy())
    planted = marchenko_pastur(lam, n, m)
    assert planted.spikes == 3
    assert planted.variance == pytest.approx(0.02**2, rel=0.03)  # the spikes left the estimate alone
    assert planted.soft_rank < 0.2


def test_a_huge_entry_is_a_correlation_trap_and_a_gaussian_matrix_has_none():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(256, 384, generator=gen) * 0.02
    clean = density(w, ESDOptions(), seed=3)
    assert clean.traps == 0
    trapped = w.clone()
    trapped[17, 40] = 0.02 * 100
    assert density(trapped, ESDOptions(), seed=3).traps == 1
    assert density(w + 0.5, ESDOptions(), seed=3).traps == 0  # a shifted matrix is not a trap: the mean goes first


def test_norm_metrics_match_their_definitions():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(80, 50, generator=gen)
    d = density(w, ESDOptions(traps=False), seed=0)
    s = torch.linalg.svdvals(w.double()).numpy()
    lam = s**2
    assert d.lambda_max == pytest.approx(lam[0], rel=1e-10)
    assert d.log_norm == pytest.approx(math.log10(lam.sum()), rel=1e-10)
    assert d.log_spectral_norm == pytest.approx(math.log10(lam[0]), rel=1e-10)
    assert d.stable_rank == pytest.approx(lam.sum() / lam[0], rel=1e-10)
    assert d.alpha_weighted == pytest.approx(d.alpha * math.log10(lam[0]))
    assert d.log_alpha_norm == pytest.approx(math.log10(np.sum(lam**d.alpha)), rel=1e-9)
    p = lam / lam.sum()
    assert d.entropy == pytest.approx(-(p * np.log(p)).sum() / math.log(50), rel=1e-9)
    assert np.allclose(d.eigenvalues, lam, rtol=1e-9)


def test_too_few_eigenvalues_is_said_not_fitted():
    d = density(torch.randn(40, 4), ESDOptions(traps=False), seed=0)
    assert d.power_law is None and "4 non-zero" in d.warning


def test_rank_deficient_matrices_count_only_real_spikes():
    rank_one = density(torch.ones(20, 30), ESDOptions(), seed=0)  # rounding leaves 19 tiny eigenvalues
    assert rank_one.mp.spikes == 1 and rank_one.traps == 0 and rank_one.nonzero == 1
    zero = density(torch.zeros(20, 30), ESDOptions(), seed=0)
    assert zero.mp.spikes == 0 and zero.power_law is None and zero.log_norm == float("-inf")


def test_esd_of_a_checkpoint_and_its_delta(zoo):
    base = open_weights(zoo["llama"])
    ft = open_finetuned(zoo["llama_ft"], base)
    result = esd(ft, base, ESDOptions(seed=5))
    assert result.matrices and all(m.delta is not None for m in result.matrices)
    m = result.matrices[0]
    w, w0 = ft.get(m.name).double(), base.get(m.name).double()
    assert m.weights.lambda_max == pytest.approx(float(torch.linalg.svdvals(w)[0] ** 2), rel=1e-9)
    assert m.delta.lambda_max == pytest.approx(float(torch.linalg.svdvals(w - w0)[0] ** 2), rel=1e-5)
    again = esd(ft, base, ESDOptions(seed=5))
    assert json.dumps(again.to_dict()) == json.dumps(result.to_dict())  # seeded: the same bytes


def test_cli_writes_json_and_plots_and_refuses_bad_input(zoo, run_cli, tmp_path, corrupt):
    code, out, err = run_cli(
        "esd",
        zoo["gpt2"],
        "--json",
        tmp_path / "esd.json",
        "--plots",
        tmp_path / "plots",
        "--report",
        tmp_path / "esd.html",
    )
    assert code == 0, err
    payload = json.loads((tmp_path / "esd.json").read_text())
    assert payload["schema"] == "weightlab.esd/1" and payload["matrices"]
    assert any(p.suffix == ".png" for p in (tmp_path / "plots").iterdir())
    assert "ESD of W" in out
    code, _, err = run_cli("esd", corrupt["truncated"], "--json", tmp_path / "bad.json")
    assert code == 2 and len(err.strip().splitlines()) == 1 and not (tmp_path / "bad.json").exists()
    code, _, err = run_cli("esd", zoo["gpt2"], "--min-evals", "1")
    assert code == 2 and "--min-evals" in err
