"""Our Iso-C, Iso-CTS, TSV-M and WUDI (Adam) against fusion-bench's functions on the same random
task vectors: the largest entry difference, beside the largest entry.

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


if __name__ == "__main__":
    main()
