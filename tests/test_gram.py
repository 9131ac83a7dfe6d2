"""The Gram route against float64 LAPACK SVD: values within the documented bound, exact top-k
vectors from one tridiagonal reduction, on CPU (scipy LAPACK) as on the torch path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import weightlab.compute.gram as gram_mod
from weightlab.compute.gram import decompose, eigen, eigenvalues, gram, singular_values, top_eigen, top_singular


def planted(m: int, n: int, s: np.ndarray, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    r = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64))
    return u @ torch.diag(torch.as_tensor(s, dtype=torch.float64)) @ v.T


@pytest.mark.parametrize("shape", [(60, 60), (90, 40), (40, 90), (700, 30)])
def test_singular_values_within_the_documented_bound(shape):
    """|σ̂_i − σ_i|/σ_i ≤ c·ε₆₄·(σ₁/σ_i)²/2 with c = 10·r: a spectrum spanning six decades."""
    r = min(shape)
    s = np.logspace(0, -6, r)
    w = planted(*shape, s).float()
    exact = np.linalg.svd(w.double().numpy(), compute_uv=False)  # of the float32 matrix itself
    ours = singular_values(w).numpy()
    assert ours.dtype == np.float64
    bound = 10 * r * np.finfo(np.float64).eps * (exact[0] / exact) ** 2 / 2
    assert np.all(np.abs(ours - exact) / exact <= np.maximum(bound, 1e-15))
    well = exact >= 1e-4 * exact[0]  # here the Gram route is below float32 resolution
    assert np.all(np.abs(ours[well] - exact[well]) / exact[well] < np.finfo(np.float32).eps)


def test_singular_values_of_a_batch_and_of_a_zero_matrix():
    stack = torch.randn(3, 20, 12, generator=torch.Generator().manual_seed(4))
    batch = singular_values(stack)
    for i in range(3):
        np.testing.assert_allclose(
            batch[i].numpy(), np.linalg.svd(stack[i].double().numpy(), compute_uv=False), rtol=1e-6
        )
    assert singular_values(torch.zeros(5, 7)).tolist() == [0.0] * 5


def test_long_matrix_gram_is_accumulated_in_blocks(monkeypatch):
    monkeypatch.setattr(gram_mod, "ROW_BLOCK", 7)
    w = torch.randn(50, 9, generator=torch.Generator().manual_seed(5))
    exact = torch.tril(w.double().T @ w.double())  # the lower triangle is the contract
    torch.testing.assert_close(torch.tril(gram(w)), exact)
    torch.testing.assert_close(torch.tril(gram(w.T.contiguous())), exact)
    torch.testing.assert_close(torch.tril(gram(w.T)), exact)  # a transposed view: no copy on the way


@pytest.mark.parametrize("shape", [(300, 120), (120, 300), (150, 150)])
def test_top_singular_triplets_equal_lapack_svd(shape):
    r = min(shape)
    w = planted(*shape, 10 * 0.9 ** np.arange(r), seed=1).float()
    g = gram(w)
    lam, _ = top_eigen(g, 10)
    torch.testing.assert_close(lam, eigenvalues(g), rtol=1e-13, atol=1e-13 * float(lam[0]))
    every, top = top_singular(w, 10)
    torch.testing.assert_close(every, lam.clamp_min(0).sqrt())
    u, sv, vh = np.linalg.svd(w.double().numpy(), full_matrices=False)
    np.testing.assert_allclose(top.S.numpy(), sv[:10], rtol=1e-12)
    np.testing.assert_allclose(np.abs(np.sum(top.U.numpy() * u[:, :10], 0)), 1, atol=1e-12)
    np.testing.assert_allclose(np.abs(np.sum(top.Vh.numpy() * vh[:10], 1)), 1, atol=1e-12)


def test_top_eigen_on_cpu_equals_the_full_eigensolver_and_handles_a_tie():
    """σ₃ = σ₄: the tied pair has no unique vectors, but spans the same plane as LAPACK's."""
    s = 10 * 0.9 ** np.arange(150)
    s[3] = s[2]
    g = gram(planted(300, 150, s, seed=2))
    lam, top = top_eigen(g, 8)
    full_lam, full = eigen(g)
    torch.testing.assert_close(lam, full_lam, rtol=1e-13, atol=1e-13 * float(lam[0]))
    top, full = top.numpy(), full[:, :8].numpy()
    np.testing.assert_allclose(np.linalg.svd(top[:, 2:4].T @ full[:, 2:4], compute_uv=False), 1, atol=1e-12)
    others = [0, 1, 4, 5, 6, 7]
    np.testing.assert_allclose(np.abs(np.sum(top[:, others] * full[:, others], 0)), 1, atol=1e-12)


def test_zero_top_singular_value_defers_to_the_thin_svd():
    w = torch.zeros(6, 4)
    w[0, 0] = 1.0
    top = top_singular(w, 3)[1]
    assert top.S.tolist() == [1.0, 0.0, 0.0] and top.U.shape == (6, 3)


def test_decompose_gives_every_vector_rounded_to_float32():
    w = planted(40, 25, np.linspace(5, 1, 25), seed=3)
    spec = decompose(w)
    assert spec.tall and spec.E.dtype == torch.float32 and spec.E.shape == (25, 25)
    v = np.linalg.svd(w.numpy(), full_matrices=False)[2].T
    np.testing.assert_allclose(np.abs(np.sum(spec.E.double().numpy() * v, 0)), 1, atol=1e-6)
    wide = decompose(w.T)
    assert not wide.tall
    torch.testing.assert_close(wide.S, spec.S)
