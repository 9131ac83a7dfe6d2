"""Merging LoRA adapters of one base into an adapter, never forming a dense update (`merge --as-adapter`).

With τ_i = s_i·L_i·R_i (L_i m×r_i, R_i r_i×n, in the out×in orientation) and coefficients c_i:

- `task-arithmetic` (Ilharco et al. 2023): λΣ c_i τ_i = [λc_1s_1L_1, …, λc_Ns_NL_N]·[R_1; …; R_N],
  exactly, at rank Σ r_i; `average` is the same with c_i/Σc and λ = 1.
- `ties` in the adapters' joint space (Stoica et al. 2025, "Model merging with SVD to tie the
  KnOTS", §3.2): the column-concatenated updates [c_1τ_1, …, c_Nτ_N] = UΣ[V_1ᵀ, …, V_Nᵀ] by one SVD,
  computed from the factors (QR of [c_is_iL_i], then the SVD of a Σr_i × N·n matrix), so that
  c_iτ_i = UΣV_iᵀ with U, Σ shared; TIES (Yadav et al. 2023: trim to the top density by magnitude,
  elect signs, disjoint mean) then merges the V_iᵀ (Σr_i × n each, with λ), and the result is
  UΣV_mergedᵀ. The update lives in a rank-Σr_i space: the adapter is exact, not approximated.
- `tsv` (Gargiulo et al. 2025, "Task Singular Vectors", Alg. 1): each c_iτ_i's exact SVD from its
  factors, its top min(r_i, ⌊min(m, n)/N⌋) triplets stacked, U and V replaced by their nearest
  orthogonal matrices; λ·U⊥Σ and V⊥ᵀ are the factors (rank Σ of the kept).

`max_rank` then keeps the best rank-k approximation of each module's merged update (its exact SVD
from the factors, Eckart & Young 1936). Modules only some adapters change are merged from those.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from weightlab.analysis.deltas import numerical_rank
from weightlab.compute.svd import lowrank_svd
from weightlab.domains import Int
from weightlab.errors import InvalidArgument
from weightlab.io.adapter import AdaptedCheckpoint, LoraAdapter
from weightlab.io.adapter_writer import LoraFactors, write_adapter
from weightlab.io.open import open_checkpoint, open_weights
from weightlab.merge.config import MergeConfig
from weightlab.merge.methods import ties
from weightlab.merge.params import Params
from weightlab.merge.subspace import tsv_factors
from weightlab.merge.run import MergeReport

ADAPTER_METHODS = ("task-arithmetic", "average", "ties", "tsv")


@dataclass
class MergedModule:
    name: str
    factors: LoraFactors
    sources: list[int]  # which adapters change this module


def _update_shape(adapter: LoraAdapter, module: str) -> tuple[int, int, bool]:
    """(out, in) of a module's update in the math orientation, from the headers alone."""
    m = adapter.modules[module]
    return (m.a.shape[1], m.b.shape[0], True) if m.embedding else (m.b.shape[0], m.a.shape[1], False)


def check_adapters(adapters: list[LoraAdapter]) -> None:
    """Adapters of one base: the same fan_in_fan_out, and each module of one shape in all of them."""
    if len({bool(a.adapter_config.get("fan_in_fan_out")) for a in adapters}) > 1:
        raise InvalidArgument("the adapters disagree on fan_in_fan_out; merge adapters of one base model", adapters[0].path)
    seen: dict[str, tuple[int, int, bool]] = {}
    for a in adapters:
        for module in a.modules:
            shape = seen.setdefault(module, _update_shape(a, module))
            if _update_shape(a, module) != shape:
                raise InvalidArgument("this module has another shape than in the other adapters; are they of one base?",
                                      a.path, module)


def knots_ties(lefts: list[torch.Tensor], rights: list[torch.Tensor], params: Params,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """TIES on the KnOTS-aligned V_iᵀ of the updates L_i·R_i (coefficients already in L_i): the
    merged update as (UΣ, V_mergedᵀ)."""
    q, k = torch.linalg.qr(torch.cat(lefts, 1))
    blocks, start = [], 0
    for left, right in zip(lefts, rights):
        blocks.append(k[:, start:start + left.shape[1]] @ right)  # Q·(that block) = L_i R_i
        start += left.shape[1]
    u, s, vh = torch.linalg.svd(torch.cat(blocks, 1), full_matrices=False)
    n = rights[0].shape[1]
    rank = numerical_rank(s, (q.shape[0], vh.shape[1]))  # of [c_1τ_1, …, c_Nτ_N], m × N·n
    u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    v_blocks = [vh[:, i * n:(i + 1) * n] for i in range(len(rights))]
    merged = ties(torch.zeros_like(v_blocks[0]), v_blocks, torch.ones(len(v_blocks), dtype=s.dtype), params, generator)
    return (q @ u) * s, merged


def tsv_of_factors(lefts: list[torch.Tensor], rights: list[torch.Tensor], tasks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """TSV-M from the factors: each update's exact SVD (`lowrank_svd`), its top min(r_i, ⌊min(m, n)/N⌋)
    non-zero triplets kept, then `tsv_factors`. Dense TSV keeps ⌊min(m, n)/N⌋ per task, padding a
    rank-r_i update with arbitrary null directions when r_i is smaller; here only real ones."""
    keep = max(1, min(lefts[0].shape[0], rights[0].shape[1]) // tasks)
    parts = []
    for left, right in zip(lefts, rights):
        svd = lowrank_svd(left, right)
        parts.append(svd.truncate(max(1, min(keep, numerical_rank(svd.S, (left.shape[0], right.shape[1]))))))
    return tsv_factors(parts)


def merge_adapters(adapters: list[LoraAdapter], method: str, coefficients: list[float], params: Params,
                   max_rank: int | None = None, seed: int = 0) -> list[MergedModule]:
    """Every module any adapter changes, merged by `method` into LoRA factors at scale 1."""
    if method not in ADAPTER_METHODS:
        raise InvalidArgument(f"--as-adapter merges with {', '.join(ADAPTER_METHODS)}; {method} needs dense task vectors "
                              "(merge without --as-adapter, or extract-lora afterwards)")
    check_adapters(adapters)
    c = torch.tensor(coefficients, dtype=torch.float64)
    if method == "average":
        c, lam = c / c.sum(), 1.0
    else:
        lam = params.lam
    generator = torch.Generator().manual_seed(seed)
    out = []
    for module in sorted({m for a in adapters for m in a.modules}):
        sources = [i for i, a in enumerate(adapters) if module in a.modules]
        lefts, rights = [], []
        for i in sources:
            left, right, scale = adapters[i].matrix_factors(module, dtype=torch.float64)
            lefts.append(left * (scale * float(c[i])))
            rights.append(right)
        if method == "ties":
            left, right = knots_ties(lefts, rights, params, generator)
        elif method == "tsv":
            left, right = tsv_of_factors(lefts, rights, len(adapters))
            left = left * lam
        else:
            left, right = torch.cat(lefts, 1) * lam, torch.cat(rights)
        if max_rank is not None and left.shape[1] > max_rank:
            svd = lowrank_svd(left, right).truncate(max_rank)
            left, right = svd.U * svd.S, svd.Vh
        embedding = adapters[sources[0]].modules[module].embedding
        out.append(MergedModule(module, LoraFactors(a=right.float().contiguous(), b=left.float().contiguous(),
                                                    embedding=embedding), sources))
    return out


def merge_as_adapter(config: MergeConfig, out_dir: str | Path, max_rank: int | None = None) -> MergeReport:
    """Merge `config.models` (PEFT LoRA adapters of `config.base`) into one adapter folder `out_dir`."""
    started = time.perf_counter()
    for flag, given in (("--coeff nan", config.coeff == "nan"), ("--svc/--lines", bool(config.modifiers)),
                        ("--dtype", config.dtype)):
        if given:
            raise InvalidArgument(f"{flag} does not apply to --as-adapter")
    Int(1, optional=True).check("--max-rank", max_rank)
    adapters = [open_checkpoint(m) for m in config.models]
    for path, a in zip(config.models, adapters):
        if not isinstance(a, LoraAdapter):
            raise InvalidArgument("--as-adapter merges PEFT LoRA adapters; this is a checkpoint", path)
    if config.base:
        base = open_weights(config.base)
        for a in adapters:
            AdaptedCheckpoint(base, a)  # refuses a module the base lacks, or of another shape
    weights = config.weights or [1.0] * len(adapters)
    merged = merge_adapters(adapters, config.method, weights, config.resolved, max_rank, config.seed)
    write_adapter(out_dir, {m.name: m.factors for m in merged}, scale=1.0,
                  base_model=config.base or adapters[0].base_model_name_or_path,
                  fan_in_fan_out=bool(adapters[0].adapter_config.get("fan_in_fan_out")))
    return MergeReport(config, str(out_dir), len(merged), [], [m.name for m in merged if len(m.sources) < len(adapters)],
                       weights, seconds=time.perf_counter() - started)
