"""Iso-C, Iso-CTS, WUDI, CART and PCB against plain references written here from the papers'
formulas, and against identities whose answer is known."""

import numpy as np
import pytest
import torch

from weightlab.merging.methods import METHODS
from weightlab.merging.subspace import wudi_objective


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def call(method, base, models, coeffs=None, **params):
    spec = METHODS[method]
    coeffs = torch.tensor(coeffs or [1.0] * len(models), dtype=torch.float64)
    return spec.fn(base, models, coeffs, spec.resolve(params), lambda i: torch.Generator().manual_seed(i))


@pytest.fixture()
def three():
    base = rand(12, 8, seed=1)
    return base, [base + rand(12, 8, seed=10 + i) * 0.1 for i in range(3)]


# ---- plain references (numpy, straight from the formulas) ------------------------------------


def ref_iso_c(base, models, coeffs, lam):
    total = sum(c * (m - base).numpy() for c, m in zip(coeffs, models))
    u, s, vt = np.linalg.svd(total, full_matrices=False)
    return base.numpy() + lam * s.mean() * u @ vt


def polar(x):
    u, _, vt = np.linalg.svd(x, full_matrices=False)
    return u @ vt


def ref_iso_cts(base, models, common, lam):
    taus = [(m - base).numpy() for m in models]
    r, n = min(taus[0].shape), len(taus)
    s = round((r - int(r * common)) / n)  # the authors' code: the task-specific total divisible by N
    s = s if n * s <= r else r // n
    k = r - n * s
    u, sig, vt = np.linalg.svd(sum(taus), full_matrices=False)
    us, ss, vs = [u[:, :k]], [sig[:k]], [vt[:k].T]
    for t in taus:
        uu, si, vv = np.linalg.svd(t - u[:, :k] @ u[:, :k].T @ t, full_matrices=False)
        us.append(uu[:, :s]), ss.append(si[:s]), vs.append(vv[:s].T)
    return (
        base.numpy() + lam * np.concatenate(ss).mean() * polar(np.concatenate(us, 1)) @ polar(np.concatenate(vs, 1)).T
    )


def ref_cart(models, coeffs, rank, lam):
    w = np.array(coeffs) / sum(coeffs)
    centre = sum(wi * m.numpy() for wi, m in zip(w, models))
    k = max(1, round(rank * min(centre.shape)))
    out = centre.copy()
    for m in models:
        u, s, vt = np.linalg.svd(m.numpy() - centre, full_matrices=False)
        out += lam * (u[:, :k] * s[:k]) @ vt[:k]
    return out


def ref_pcb(base, models, ratio, lam):
    """PCB exactly as its reference code sorts: clamp by sorted positions, normalise per task."""
    taus = np.stack([(m - base).numpy().reshape(-1) for m in models])
    n, d = taus.shape

    def clamp(x, lo_ratio, hi_ratio):
        srt = np.sort(x)
        return np.clip(x, srt[int(d * lo_ratio)], srt[int(d * (1 - hi_ratio)) - 1])

    def normalise(x):
        return (x - x.min()) / (x.max() - x.min())

    mags = np.stack([clamp(np.abs(t), 0.0001, 0.0001) for t in taus])
    clipped = np.sign(taus) * mags
    intra = np.exp(n * np.stack([normalise(m) for m in mags]) ** 2)
    inter = np.tanh(taus * taus.sum(0))
    scores = intra * inter
    weights = np.stack([normalise(clamp(s, 1 - ratio, 0)) for s in scores])
    merged = (clipped * weights).sum(0) / np.maximum(weights.sum(0), 1e-12)
    return base.numpy() + lam * merged.reshape(base.shape)


def test_iso_c_equals_its_reference(three):
    base, models = three
    got = call("iso-c", base, models, [0.5, 1.0, 2.0], **{"lambda": 1.3})
    np.testing.assert_allclose(got.numpy(), ref_iso_c(base, models, [0.5, 1.0, 2.0], 1.3), atol=1e-12)


@pytest.mark.parametrize("common", [0.8, 0.5, 0.0])
def test_iso_cts_equals_its_reference(three, common):
    base, models = three
    got = call("iso-cts", base, models, common=common)
    np.testing.assert_allclose(got.numpy(), ref_iso_cts(base, models, common, 1.0), atol=1e-10)


def test_iso_cts_with_all_of_the_rank_common_is_iso_c(three):
    base, models = three
    torch.testing.assert_close(call("iso-cts", base, models, common=1.0), call("iso-c", base, models))


def test_iso_c_flattens_one_task_vector_to_its_mean_singular_value():
    base, tau = rand(9, 6, seed=2), rand(9, 6, seed=3)
    u, s, vt = np.linalg.svd(tau.numpy(), full_matrices=False)
    got = call("iso-c", base, [base + tau])
    np.testing.assert_allclose((got - base).numpy(), s.mean() * u @ vt, atol=1e-12)


def test_cart_equals_its_reference(three):
    base, models = three
    got = call("cart", base, models, [1.0, 2.0, 1.0], rank=0.25, **{"lambda": 0.7})
    np.testing.assert_allclose(got.numpy(), ref_cart(models, [1.0, 2.0, 1.0], 0.25, 0.7), atol=1e-12)


def test_cart_at_full_rank_is_the_average_and_one_model_is_itself(three):
    base, models = three
    torch.testing.assert_close(call("cart", base, models, rank=1.0), sum(models) / 3)
    torch.testing.assert_close(call("cart", base, models[:1]), models[0])


def test_pcb_equals_its_reference(three):
    base, models = three
    got = call("pcb", base, models, ratio=0.3, **{"lambda": 1.5})
    np.testing.assert_allclose(got.numpy(), ref_pcb(base, models, 0.3, 1.5), atol=1e-12)


def test_pcb_on_a_large_tensor_keeps_each_tasks_top_ratio():
    base = torch.zeros(300, 300, dtype=torch.float64)
    models = [rand(300, 300, seed=s) for s in (4, 5)]
    got = call("pcb", base, models, ratio=0.1)
    np.testing.assert_allclose(got.numpy(), ref_pcb(base, models, 0.1, 1.0), atol=1e-12)
    assert 0.1 < float((got != 0).double().mean()) <= 0.2  # each task's top 10%, overlapping a little


# ---- WUDI: the closed form is the optimum of the paper's loss --------------------------------


def wudi_gradient(x, mats):
    grad = torch.zeros_like(x)
    for m in mats:
        grad += 2 * (x - m) @ m.T @ m / float((m * m).sum())
    return grad


def test_wudi_closed_form_zeroes_the_gradient_and_beats_every_perturbation(three):
    base, models = three
    got = call("wudi", base, models) - base
    mats = [m - base for m in models]
    assert float(wudi_gradient(got, mats).abs().max()) < 1e-10
    best = wudi_objective(got, mats)
    for seed in range(20):
        assert wudi_objective(got + 1e-3 * rand(12, 8, seed=100 + seed), mats) > best


def test_wudi_adam_run_to_convergence_reaches_the_closed_form(three):
    base, models = three
    exact = call("wudi", base, models)
    adam = call("wudi-adam", base, models, steps=30_000, lr=1e-4)
    torch.testing.assert_close(adam, exact, atol=1e-5, rtol=0)


def test_wudi_of_one_model_is_its_task_vector_and_of_orthogonal_updates_their_sum():
    base = rand(10, 8, seed=6)
    tau = rand(10, 8, seed=7)
    torch.testing.assert_close(call("wudi", base, [base + tau]), base + tau)
    q = torch.linalg.qr(rand(8, 8, seed=8))[0]  # row spaces: the first 3 and the last 4 columns of q
    t1, t2 = rand(10, 3, seed=9) @ q[:, :3].T, rand(10, 4, seed=10) @ q[:, 4:].T
    torch.testing.assert_close(call("wudi", base, [base + t1, base + t2]), base + t1 + t2)


@pytest.mark.parametrize("method", ["iso-c", "iso-cts", "wudi", "wudi-adam", "tsv"])
def test_vectors_get_the_mean_update(method):
    base = rand(16, seed=11)
    models = [base + rand(16, seed=12), base + rand(16, seed=13)]
    torch.testing.assert_close(call(method, base, models), base + (models[0] - base + models[1] - base) / 2)


# ---- modifiers: SVC per matrix, LiNeS per layer ------------------------------------------------

from weightlab.merging.modifiers import calibrate


def ref_svc(merged, taus, alpha):
    u, s, vt = np.linalg.svd(merged, full_matrices=False)
    response = s[:, None] * vt
    floor = np.zeros_like(s)
    for t in taus:
        own = u.T @ t
        n2 = (own * own).sum(1)
        floor += np.maximum(alpha, np.where(n2 > 0, (response * own).sum(1) / np.where(n2 > 0, n2, 1), 0))
    return (u * (len(taus) / floor * s)) @ vt


def test_svc_equals_its_reference():
    taus = [rand(10, 7, seed=20 + i) for i in range(3)]
    merged = sum(taus) * 0.8
    got = calibrate(merged, taus, 0.5)
    np.testing.assert_allclose(got.numpy(), ref_svc(merged.numpy(), [t.numpy() for t in taus], 0.5), atol=1e-12)


def test_svc_shrinks_a_shared_direction_to_one_copy_and_keeps_owned_ones():
    tau = rand(10, 7, seed=30)
    torch.testing.assert_close(calibrate(3 * tau, [tau, tau, tau], 1.0), tau)  # summed three times: back to once
    q = torch.linalg.qr(rand(7, 7, seed=31))[0]
    t1, t2 = rand(10, 3, seed=32) @ q[:, :3].T, rand(10, 3, seed=33) @ q[:, 3:6].T
    torch.testing.assert_close(calibrate(t1 + t2, [t1, t2], 1.0), t1 + t2)  # orthogonal updates: unchanged


def test_lines_scales_each_layer_of_the_merged_task_vector_by_depth(tmp_path):
    from safetensors.torch import load_file, save_file

    from weightlab.merging import merge
    from weightlab.merging.config import build_config

    names = [f"layers.{i}.mlp.up_proj.weight" for i in range(3)] + ["embed_tokens.weight"]
    base = {n: rand(6, 4, seed=40 + i).float() for i, n in enumerate(names)}
    models = [
        {n: v + rand(6, 4, seed=50 + 10 * j + i).float() for i, (n, v) in enumerate(base.items())} for j in range(2)
    ]
    for stem, tensors in (("base", base), ("a", models[0]), ("b", models[1])):
        (tmp_path / stem).mkdir()
        save_file(tensors, tmp_path / stem / "model.safetensors")
    cfg = build_config(
        {
            "method": "task-arithmetic",
            "base": str(tmp_path / "base"),
            "modifiers": ["lines"],
            "models": [str(tmp_path / "a"), str(tmp_path / "b")],
            "param_values": {"lines_beta": 0.6},
        }
    )
    report = merge(cfg, tmp_path / "out")
    assert report.lines_alpha == pytest.approx(0.5)  # task arithmetic: ‖Σ τ_i‖₁ = ‖τ_m‖₁, so α = 1/N
    got = load_file(next((tmp_path / "out").glob("*.safetensors")))
    for n in names:
        layer = int(n.split(".")[1]) if n.startswith("layers") else None
        scale = 0.5 + (0.6 * layer / 2 if layer is not None else 0.0)
        expected = base[n] + scale * (models[0][n] - base[n] + models[1][n] - base[n])
        torch.testing.assert_close(got[n], expected, atol=1e-6, rtol=0)
    assert not list(tmp_path.glob(".weightlab-lines-*"))  # the spill is gone
