"""`angles`: equal to scipy, known angles for planted rotations, task vectors compared with --base."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.linalg
import torch
from safetensors.torch import save_file

from weightlab.analysis.angles import AnglesOptions, angles, principal_angles
from weightlab.compute.device import Compute
from weightlab.errors import InvalidArgument
from weightlab.io import open_checkpoint, open_finetuned

CPU64 = Compute(torch.device("cpu"), torch.float64, 1)


@pytest.mark.parametrize("m, ka, kb, seed", [(40, 5, 5, 0), (60, 8, 3, 1), (30, 2, 6, 2)])
def test_principal_angles_equal_scipy(m, ka, kb, seed):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(m, ka, generator=gen, dtype=torch.float64)
    b = a[:, :1] @ torch.ones(1, kb, dtype=torch.float64) + 0.3 * torch.randn(m, kb, generator=gen, dtype=torch.float64)
    qa, qb = torch.linalg.qr(a)[0], torch.linalg.qr(b)[0]
    ours = principal_angles(qa, qb).numpy()
    ref = np.sort(scipy.linalg.subspace_angles(a.numpy(), b.numpy()))
    np.testing.assert_allclose(ours, ref, atol=1e-12)


def test_tiny_angles_stay_accurate():
    """arccos alone would return 0 (or 1e-8 noise) here: the sine route keeps 1e-9 rad."""
    q = torch.linalg.qr(torch.randn(50, 3, dtype=torch.float64))[0]
    perturbed = q.clone()
    e = torch.linalg.qr(torch.cat([q, torch.randn(50, 1, dtype=torch.float64)], 1))[0][:, 3]
    perturbed[:, 0] = math.cos(1e-9) * q[:, 0] + math.sin(1e-9) * e
    theta = principal_angles(q, perturbed)
    assert theta[-1].item() == pytest.approx(1e-9, rel=1e-3)


def rotated_pair(tmp_path, theta: float):
    """W_B = G·W_A with G a rotation by θ in the plane of u_1 and u_10: the top-4 left subspaces
    meet at angles [0, 0, 0, θ]; the right subspaces coincide."""
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(40, 30, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(30, 30, generator=gen, dtype=torch.float64))
    w_a = u @ torch.diag(torch.linspace(10, 1, 30, dtype=torch.float64)) @ v.T
    g = torch.eye(40, dtype=torch.float64)
    x, y = u[:, 0], u[:, 9]
    g += (math.cos(theta) - 1) * (torch.outer(x, x) + torch.outer(y, y)) + math.sin(theta) * (
        torch.outer(y, x) - torch.outer(x, y)
    )
    save_file({"layers.0.self_attn.q_proj.weight": w_a}, tmp_path / "a.safetensors")
    save_file({"layers.0.self_attn.q_proj.weight": g @ w_a}, tmp_path / "b.safetensors")
    return open_checkpoint(tmp_path / "a.safetensors"), open_checkpoint(tmp_path / "b.safetensors")


def test_planted_rotation_gives_its_angle_on_the_left_and_none_on_the_right(tmp_path):
    a, b = rotated_pair(tmp_path, math.radians(25))
    result = angles(a, b, options=AnglesOptions(k=4, side="both"), compute=CPU64)
    left, right = (next(m for m in result.matrices if m.side == s) for s in ("left", "right"))
    np.testing.assert_allclose(left.angles_deg, [0, 0, 0, 25], atol=1e-6)
    np.testing.assert_allclose(right.angles_deg, [0, 0, 0, 0], atol=1e-6)
    assert left.cosines[-1] == pytest.approx(math.cos(math.radians(25)))


def test_randomized_svd_route_agrees_with_exact(tmp_path):
    a, b = rotated_pair(tmp_path, math.radians(40))
    exact = angles(a, b, options=AnglesOptions(k=4), compute=CPU64).matrices[0]
    fast = angles(a, b, options=AnglesOptions(k=4, svd="randomized", seed=1), compute=CPU64).matrices[0]
    # σ linear from 10 to 1 over 30: the bound (σ_15/σ_4)^9 ≈ 0.012 rad is loose; we see < 3e-4°
    np.testing.assert_allclose(fast.angles_deg, exact.angles_deg, atol=1e-3)


def test_task_vector_angles_with_base(tmp_path):
    """ΔW_A = x yᵀ and ΔW_B = x' yᵀ with ∠(x, x') = 30°: one left angle of 30°, k capped at rank 1."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(20, 16, generator=gen, dtype=torch.float64)
    x, z = torch.linalg.qr(torch.randn(20, 2, generator=gen, dtype=torch.float64))[0].T
    y = torch.randn(16, generator=gen, dtype=torch.float64)
    x2 = math.cos(math.radians(30)) * x + math.sin(math.radians(30)) * z
    for name, delta in (("base", 0), ("a", torch.outer(x, y)), ("b", 2 * torch.outer(x2, y))):
        save_file({"layers.2.mlp.down_proj.weight": w + delta}, tmp_path / f"{name}.safetensors")
    base, a, b = (open_checkpoint(tmp_path / f"{n}.safetensors") for n in ("base", "a", "b"))
    m = angles(a, b, base, AnglesOptions(k=16, side="both"), CPU64).matrices
    left, right = m
    assert left.k == 1 and left.angles_deg == pytest.approx([30.0], abs=1e-6)
    assert right.angles_deg == pytest.approx([0.0], abs=1e-5)


def test_adapters_against_base_use_their_factors_and_match_dense(zoo, adapters, tmp_path):
    from peft import PeftModel
    from transformers import AutoModel

    base = open_checkpoint(zoo["llama"])
    merged_dir = tmp_path / "merged"
    PeftModel.from_pretrained(
        AutoModel.from_pretrained(zoo["llama"]), adapters["llama"]
    ).merge_and_unload().save_pretrained(merged_dir)
    ft_dense = open_checkpoint(merged_dir)
    ft_adapter = open_finetuned(adapters["llama"], base)
    via_factors = angles(ft_adapter, open_checkpoint(zoo["llama_ft"]), base, AnglesOptions(k=8), CPU64)
    via_dense = angles(
        ft_dense, open_checkpoint(zoo["llama_ft"]), base, AnglesOptions(k=8, include="q_proj|v_proj|down_proj"), CPU64
    )
    dense = {m.name: m for m in via_dense.matrices}
    for m in via_factors.matrices:
        assert m.k == 4  # the adapter's rank caps the subspace
        np.testing.assert_allclose(m.angles_deg, dense[m.name].angles_deg, atol=1e-3)


def test_adapter_without_base_is_refused(zoo, adapters):
    base = open_checkpoint(zoo["llama"])
    with pytest.raises(InvalidArgument, match="--base"):
        angles(open_finetuned(adapters["llama"], base), base)


def test_angles_cli_json_and_plots(zoo, run_cli, tmp_path):
    code, out, err = run_cli(
        "angles", zoo["llama_ft"], zoo["llama"], "-k", "4", "--json", tmp_path / "a.json", "--plots", tmp_path / "plots"
    )
    assert code == 0, err
    data = json.loads((tmp_path / "a.json").read_text())
    assert data["schema"] == "weightlab.angles/1" and data["base"] is None
    assert all(0 <= a <= 90 for m in data["matrices"] for a in m["angles_deg"])
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        ".weightlab-output",
        "angles_heatmap.png",
        "angles_vs_depth.png",
    ]
    assert "principal angles" in out


def test_bad_side_is_a_clear_error(zoo, run_cli):
    code, _, err = run_cli("angles", zoo["llama"], zoo["llama_ft"], "--side", "up")
    assert code == 2 and "--side" in err
