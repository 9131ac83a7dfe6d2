"""Magnitude and direction in `spectrum` (MAP's vector view, DoRA's row magnitudes), each against
a plain computation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from weightlab.analysis.spectrum import Norms, magnitude_direction, vector_angle


def _norms(x: torch.Tensor) -> Norms:
    return Norms(0.0, float(x.double().norm()), 0.0, 0.0)


def _record(w: torch.Tensor, w_ft: torch.Tensor):
    return magnitude_direction(w, w_ft, _norms(w), _norms(w_ft), _norms(w_ft - w))


def test_scaling_changes_magnitude_only():
    w = torch.randn(40, 30, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    r = _record(w, 1.3 * w)
    assert r.norm_ratio == pytest.approx(1.3) and r.angle_deg == pytest.approx(0.0, abs=1e-6)
    assert r.magnitude_change == pytest.approx(0.3) and r.magnitude_change_max == pytest.approx(0.3)
    assert r.dora_delta_d == pytest.approx(0.0, abs=1e-12)


def test_against_plain_row_loops_and_arccos():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(24, 16, generator=gen, dtype=torch.float64)
    w_ft = w + 0.4 * torch.randn(24, 16, generator=gen, dtype=torch.float64)
    r = _record(w, w_ft)
    cos = float((w * w_ft).sum() / (w.norm() * w_ft.norm()))
    assert r.angle_deg == pytest.approx(math.degrees(math.acos(cos)), rel=1e-9)
    rows = [(float(w[j].norm()), float(w_ft[j].norm()), float(w[j] @ w_ft[j])) for j in range(24)]
    assert r.dora_delta_m == pytest.approx(sum(abs(b - a) for a, b, _ in rows) / 24, rel=1e-12)
    assert r.dora_delta_d == pytest.approx(sum(1 - d / (a * b) for a, b, d in rows) / 24, rel=1e-9)
    assert r.magnitude_change_max == pytest.approx(max(abs(b - a) / a for a, b, _ in rows), rel=1e-12)


def test_tiny_angles_are_exact_where_arccos_cancels():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(64, 64, generator=gen, dtype=torch.float64)
    g = torch.randn(64, 64, generator=gen, dtype=torch.float64)
    g -= (g * w).sum() / (w * w).sum() * w  # orthogonal to W: tan θ = ε‖G‖/‖W‖
    eps = 1e-9
    expected = math.degrees(math.atan(eps * float(g.norm()) / float(w.norm())))
    a, d = float(w.norm()), eps * float(g.norm())
    b = math.hypot(a, d)
    assert vector_angle(a, b, d) == pytest.approx(expected, rel=1e-6)


def test_spectrum_json_carries_the_record(zoo, run_cli, tmp_path):
    code, _, err = run_cli(
        "spectrum", zoo["llama"], zoo["llama_ft"], "--json", tmp_path / "s.json", "--csv", tmp_path / "s.csv"
    )
    assert code == 0, err
    m = json.loads((tmp_path / "s.json").read_text())["matrices"][0]
    assert m["direction"]["angle_deg"] > 0 and m["direction"]["norm_ratio"] > 0
    assert "direction_dora_delta_d" in (tmp_path / "s.csv").read_text().splitlines()[0]
