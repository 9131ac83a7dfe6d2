"""Our Iso-C, Iso-CTS, TSV-M and WUDI (Adam) against fusion-bench's functions on the same random
task vectors, and our RegMean, RegMean++ and Fisher merges against fusion-bench's on the same
weights and statistics (Gram matrices, diagonal Fisher): the largest entry difference, beside the
largest entry. (The statistics themselves are checked against plain references in
tests/test_merge_data_aware.py; fusion-bench collects them through its own CLIP/GPT-2 trainers.)

Runs only where `fusion_bench` is importable (`pip install fusion-bench` in the benchmark
environment; it is heavy and not a test dependency):

    python benchmarks/vs_fusion_bench.py
"""

from __future__ import annotations

import torch

from weightlab.merging.methods import METHODS


def ours(method: str, taus: list[torch.Tensor], **params: float) -> torch.Tensor:
    spec = METHODS[method]
    base = torch.zeros_like(taus[0])
    coeffs = torch.ones(len(taus), dtype=taus[0].dtype)
    return spec.fn(base, [base + t for t in taus], coeffs, spec.resolve(params), lambda i: torch.Generator())


def main() -> None:
    try:
        from fusion_bench.method.isotropic_merging.iso_utils import iso_c, iso_cts
        from fusion_bench.method.task_singular_vector.utils.TSVM_utils import compute_and_sum_svd_mem_reduction
        from fusion_bench.method.wudi.wudi import wudi_merging
    except ImportError as e:
        print(f"fusion-bench is not importable here ({e}); nothing to compare")
        return
    gen = torch.Generator().manual_seed(0)
    for shape, n in (((96, 384), 6), ((384, 96), 6), ((128, 128), 3)):
        taus = [torch.randn(*shape, generator=gen, dtype=torch.float64) * 1e-3 for _ in range(n)]
        theirs_c = iso_c([{"w": t} for t in taus], accelerator="cpu")["w"]
        theirs_cts = iso_cts([{"w": t} for t in taus], common_space_fraction=0.8, accelerator="cpu")["w"]
        theirs_tsv = compute_and_sum_svd_mem_reduction([{"w": t} for t in taus], accelerator="cpu")["w"]
        with torch.enable_grad():
            theirs_wudi = wudi_merging([{"w": t} for t in taus], accelerator="cpu")["w"].detach()
        pairs = {
            "iso-c": (ours("iso-c", taus), theirs_c),
            "iso-cts": (ours("iso-cts", taus, common=0.8), theirs_cts),
            "tsv": (ours("tsv", taus), theirs_tsv),
            "wudi-adam": (ours("wudi-adam", taus), theirs_wudi),
        }
        print(
            f"{shape} × {n} tasks: "
            + ", ".join(
                f"{name} max |Δ| {float((a - b).abs().max()):.1e} (entries to {float(b.abs().max()):.1e})"
                for name, (a, b) in pairs.items()
            )
        )


def data_aware() -> None:
    from fusion_bench.method.fisher_merging.fisher_merging import merging_with_fisher_weights
    from fusion_bench.method.regmean.regmean import merging_with_regmean_weights
    from fusion_bench.method.regmean_plusplus.regmean_plusplus import regmean_params_merge

    gen = torch.Generator().manual_seed(1)
    for (out_dim, in_dim), n in (((96, 384), 6), ((384, 96), 6), ((64, 64), 3)):
        weights = [torch.randn(out_dim, in_dim, generator=gen, dtype=torch.float64) * 0.05 for _ in range(n)]
        inputs = [torch.randn(512, in_dim, generator=gen, dtype=torch.float64) for _ in range(n)]
        grams = [x.T @ x for x in inputs]
        spec = METHODS["regmean"]
        params = spec.resolve({"alpha": 0.9})
        mine = spec.fn(None, weights, torch.ones(n), params, None, statistics=(False, grams))
        theirs = merging_with_regmean_weights({"l.weight": weights}, [{"l": g} for g in grams], 0.9)["l.weight"]
        theirs_pp = regmean_params_merge(weights, grams, 0.9)
        fishers = [torch.rand(out_dim, in_dim, generator=gen, dtype=torch.float64) ** 4 for _ in range(n)]
        coeffs = torch.tensor([1.0 + i for i in range(n)], dtype=torch.float64)
        fspec = METHODS["fisher"]
        mine_f = fspec.fn(None, weights, coeffs, fspec.resolve({}), None, statistics=(False, fishers))
        floor = 1e-6 * float(sum(c * f for c, f in zip(coeffs, fishers)).mean())  # ours is relative to the tensor
        theirs_f = merging_with_fisher_weights(
            {"l.weight": weights}, [{"l.weight": f} for f in fishers], coeffs, False, floor
        )["l.weight"]
        exact = spec.fn(None, weights, torch.ones(n), spec.resolve({"alpha": 1.0}), None, statistics=(False, grams))
        theirs_exact = merging_with_regmean_weights({"l.weight": weights}, [{"l": g} for g in grams], 1.0)["l.weight"]
        pairs = {  # fusion-bench builds the α mask in float32: at α = 0.9 the two differ by its rounding
            "regmean α=0.9": (mine, theirs),
            "regmean α=1": (exact, theirs_exact),
            "regmean++ (merge step)": (mine, theirs_pp),
            "fisher": (mine_f, theirs_f),
        }
        print(
            f"{(out_dim, in_dim)} × {n} models: "
            + ", ".join(
                f"{name} max |Δ| {float((a - b).abs().max()):.1e} (entries to {float(b.abs().max()):.1e})"
                for name, (a, b) in pairs.items()
            )
        )


if __name__ == "__main__":
    main()
    try:
        data_aware()
    except ImportError as e:
        print(f"fusion-bench's data-aware merges are not importable here ({e})")
