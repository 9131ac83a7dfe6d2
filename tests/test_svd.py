"""The SVD helpers against numpy/scipy: exact routes agree, randomized top-k within its bound
(all singular values by the Gram route: tests/test_gram.py)."""

from __future__ import annotations

import numpy as np
import torch

from weightlab.compute.svd import full_svd, lowrank_svd, randomized_svd, top_svd


def decaying(m: int, n: int, seed: int = 0, decay: float = 0.9) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=gen, dtype=torch.float64))
    s = decay ** torch.arange(min(m, n), dtype=torch.float64) * 10
    return u @ torch.diag(s) @ v.T


def test_batched_svd_equals_one_by_one():
    stack = torch.randn(3, 12, 9, dtype=torch.float64)
    batched = full_svd(stack)
    for i in range(3):
        single = full_svd(stack[i])
        torch.testing.assert_close(batched.S[i], single.S)
        torch.testing.assert_close((batched.U[i] * batched.S[i]) @ batched.Vh[i], stack[i])


def test_randomized_top_k_matches_exact_within_the_documented_tolerance():
    """Decay 0.9 per index, k=8, p=10, q=4: (σ_19/σ_8)^9 ≈ 0.9^99 ≈ 3e-5 bounds the error."""
    w = decaying(300, 200)
    exact = top_svd(w, 8)
    approx = randomized_svd(w, 8, seed=3)
    torch.testing.assert_close(approx.S, exact.S, rtol=1e-6, atol=0)
    cosines = torch.linalg.svdvals(approx.U.T @ exact.U)
    assert float(cosines.min()) > 1 - 1e-8


def test_randomized_svd_is_deterministic_for_a_seed():
    w = decaying(120, 80).float()
    a, b = randomized_svd(w, 5, seed=7), randomized_svd(w, 5, seed=7)
    assert torch.equal(a.U, b.U) and torch.equal(a.S, b.S) and torch.equal(a.Vh, b.Vh)


def test_lowrank_svd_of_factors_equals_the_dense_svd():
    gen = torch.Generator().manual_seed(2)
    b, a = (
        torch.randn(50, 4, generator=gen, dtype=torch.float64),
        torch.randn(4, 70, generator=gen, dtype=torch.float64),
    )
    got = lowrank_svd(b, a, scale=2.5)
    dense = 2.5 * b @ a
    np.testing.assert_allclose(got.S.numpy(), np.linalg.svd(dense.numpy(), compute_uv=False)[:4], rtol=1e-10)
    torch.testing.assert_close((got.U * got.S) @ got.Vh, dense)
    torch.testing.assert_close(got.U.T @ got.U, torch.eye(4, dtype=torch.float64))
