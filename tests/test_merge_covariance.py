"""ACE-Merging against its defining objective (the closed form zeroes its gradient) and against a
plain numpy reference written here from the formulas; the shared regression solver on a planted
least-squares problem."""

import numpy as np
import pytest
import torch

from weightlab.merging.covariance import ace_objective, ace_terms, regression_merge, solve_right
from weightlab.merging.methods import METHODS


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def call(method, base, models, **params):
    spec = METHODS[method]
    coeffs = torch.ones(len(models), dtype=torch.float64)
    return spec.fn(base, models, coeffs, spec.resolve(params), lambda i: torch.Generator().manual_seed(i))


def ref_ace(taus, ridge=1e-2, refine=0.3, threshold=0.3):
    """ACE from the formulas, in numpy: covariances of centred rows, unit trace when heterogeneous."""
    taus = [t.numpy() for t in taus]
    energies = np.array([(t * t).sum() for t in taus])
    logs = np.log(energies + 1e-12)
    heterogeneous = logs.var() / (logs.mean() ** 2 + 1e-12) > threshold
    n = taus[0].shape[1]
    covs, regs = [], []
    for t in taus:
        c = (t - t.mean(0)).T @ (t - t.mean(0))
        s = 1 / (np.trace(c) + 1e-12) if heterogeneous else 1.0
        covs.append(c * s)
        regs.append(c * s + ridge * s * np.eye(n))
    prior = sum(covs) / len(taus) / ((energies.mean() + 1e-12) if heterogeneous else 1.0)
    merged = sum(t @ r for t, r in zip(taus, regs)) @ np.linalg.inv(sum(regs) + prior)
    if heterogeneous:
        mean = sum(regs) / len(taus)
        u, s, vt = np.linalg.svd(merged + sum(t @ (c - mean) for t, c in zip(taus, covs)), full_matrices=False)
        k = int(len(s) * refine)
        merged = merged + s[:k].mean() * u[:, :k] @ vt[:k]
    return merged, heterogeneous


@pytest.fixture()
def alike():
    base = rand(12, 8, seed=1)
    return base, [base + rand(12, 8, seed=10 + i) * 0.01 for i in range(3)]  # ‖τ‖² ≈ 0.01, as real updates


@pytest.fixture()
def unlike():
    """Task vectors whose energies differ by orders of magnitude: the heterogeneous branch."""
    base = rand(12, 8, seed=2)
    return base, [base + rand(12, 8, seed=20 + i) * 10.0**-i for i in range(3)]


def test_ace_closed_form_zeroes_the_gradient_of_its_objective(alike):
    base, models = alike
    taus = [m - base for m in models]
    got = call("ace", base, models) - base
    _, regs, prior, heterogeneous = ace_terms(taus, 1e-2, 0.3)
    assert not heterogeneous
    gradient = sum((got - t) @ c for t, c in zip(taus, regs)) + got @ prior
    assert float(gradient.abs().max()) < 1e-12
    best = ace_objective(got, taus, 1e-2, 0.3)
    for seed in range(20):
        assert ace_objective(got + 1e-5 * rand(12, 8, seed=100 + seed), taus, 1e-2, 0.3) > best


@pytest.mark.parametrize("case", ["alike", "unlike"])
def test_ace_equals_the_numpy_reference(case, request):
    base, models = request.getfixturevalue(case)
    want, heterogeneous = ref_ace([m - base for m in models])
    assert heterogeneous == (case == "unlike")
    torch.testing.assert_close(call("ace", base, models, **{"lambda": 0.7}), base + 0.7 * torch.from_numpy(want))


def test_ace_parameters_change_what_they_say(unlike):
    base, models = unlike
    plain = call("ace", base, models)
    assert not torch.equal(call("ace", base, models, refine=0.0), plain)  # no refinement
    assert not torch.equal(call("ace", base, models, ridge=1.0), plain)
    # above every γ, the tasks count as alike: no normalisation, no refinement
    torch.testing.assert_close(
        call("ace", base, models, heterogeneity=1e6) - base,
        torch.from_numpy(ref_ace([m - base for m in models], threshold=1e6)[0]),
    )


def test_ace_vectors_get_the_mean_update():
    base = rand(16, seed=11)
    models = [base + rand(16, seed=12), base + rand(16, seed=13)]
    torch.testing.assert_close(call("ace", base, models), base + (models[0] - base + models[1] - base) / 2)


def test_regression_merge_recovers_the_least_squares_merge():
    """Two models and their inputs: the merge equals lstsq of the stacked outputs on the stacked inputs."""
    w = [rand(5, 7, seed=s) for s in (1, 2)]
    x = [rand(40, 7, seed=s) for s in (3, 4)]
    want = np.linalg.lstsq(
        np.vstack([xi.numpy() for xi in x]), np.vstack([(xi @ wi.T).numpy() for xi, wi in zip(x, w)]), rcond=None
    )[0].T
    got = regression_merge(w, [xi.T @ xi for xi in x])
    np.testing.assert_allclose(got.numpy(), want, atol=1e-12)


def test_solve_right_takes_the_minimum_norm_solution_when_singular():
    a = torch.diag(torch.tensor([2.0, 0.0, 1.0], dtype=torch.float64))
    b = torch.tensor([[4.0, 0.0, 3.0]], dtype=torch.float64)
    torch.testing.assert_close(solve_right(b, a), torch.tensor([[2.0, 0.0, 3.0]], dtype=torch.float64))
