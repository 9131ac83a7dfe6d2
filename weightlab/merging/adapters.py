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

- every other method that merges task vectors against a base (iso-c, iso-cts, wudi, ace, pcb,
  dare, breadcrumbs, model-stock, …) in the adapters' core space (Panariello et al. 2025, "Accurate
  and Efficient Low-Rank Model Merging in Core Space", NeurIPS, §3): orthonormal bases U_ref of
  span[L_1, …, L_N] and V_ref of span[R_1ᵀ, …, R_Nᵀ] (QR of the stacked factors) give each update's
  core M_i = U_refᵀL_iR_iV_ref, a Σr_i × Σr_i matrix with τ_i = U_refM_iV_refᵀ exactly; the dense
  method merges the M_i (base 0) and U_ref·M, V_refᵀ are the factors. Methods that commute with
  orthogonal changes of basis (task arithmetic, iso-c, wudi, model-stock) give exactly the dense
  merge of the densified adapters; elementwise ones (dare, breadcrumbs, pcb) and those whose split
  depends on the matrix's full size (iso-cts) merge in the core space, as the paper does.

`max_rank` then keeps the best rank-k approximation of each module's merged update (its exact SVD
from the factors, Eckart & Young 1936). Modules only some adapters change are merged from those.

An adapter whose update of a module is zero (B = 0, PEFT's default initialisation, or a zero
coefficient) contributes no direction there; a module no adapter changes is not written, and a
merge that changes nothing is refused. What is not a LoRA product is merged as the dense method
merges the densified adapters: LoRA biases (lora_bias) as task vectors s_i·b_i, tensors of saved
modules (modules_to_save) as θ_i against the base's tensor (an adapter that does not save one
leaves the base's), so `--base` is needed for those.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from weightlab.compute.deltas import numerical_rank
from weightlab.compute.svd import lowrank_svd
from weightlab.errors import InvalidArgument, ShapeMismatch
from weightlab.io.adapter import AdaptedCheckpoint, LoraAdapter
from weightlab.io.adapter_writer import LoraFactors, NewAdapter
from weightlab.io.checkpoint import Checkpoint
from weightlab.io.open import open_checkpoint
from weightlab.io.safetensors_file import torch_dtype
from weightlab.merging.config import RECORD, MergeConfig, record_yaml
from weightlab.merging.methods import METHODS, MergeMethod
from weightlab.merging.params import Generator, Params
from weightlab.merging.run import MergeReport, auto_lambda, open_base, tensor_seed, weighted_sum_norm
from weightlab.merging.subspace import tsv_factors
from weightlab.merging.ties import ties

ADAPTER_METHODS = ("task-arithmetic", "average", "ties", "tsv")  # in their own joint spaces; others in core space


def adapter_methods() -> tuple[str, ...]:
    """What `--as-adapter` merges: the four above, and in core space every method of task vectors
    against a base that takes no data."""
    core = (m.name for m in METHODS.values() if m.needs_base and m.task_vectors and not (m.calibration or m.nan))
    return tuple(dict.fromkeys([*ADAPTER_METHODS, *core]))


@dataclass
class MergedModule:
    name: str
    factors: LoraFactors
    sources: list[int]  # which adapters change this module


@dataclass
class MergedAdapter:
    modules: list[MergedModule]
    saved: dict[str, torch.Tensor]  # whole tensors of saved modules, by their name in the adapters
    left_out: list[str]  # saved tensors the base lacks
    auto_lambda: dict[str, float] = field(default_factory=dict)  # `lambda: auto`: λ chosen per tensor


def _update_shape(adapter: LoraAdapter, module: str) -> tuple[int, int, bool]:
    """(out, in) of a module's update in the math orientation, from the headers alone."""
    m = adapter.modules[module]
    return (m.a.shape[1], m.b.shape[0], True) if m.embedding else (m.b.shape[0], m.a.shape[1], False)


def check_adapters(adapters: list[LoraAdapter]) -> None:
    """Adapters of one base: the same fan_in_fan_out, and each module of one shape in all of them."""
    for flag in ("fan_in_fan_out", "lora_bias"):
        if len({bool(a.adapter_config.get(flag)) for a in adapters}) > 1:
            raise InvalidArgument(
                f"the adapters disagree on {flag}; merge adapters of one base model alike "
                "(or merge them densely, without --as-adapter)",
                adapters[0].path,
            )
    seen: dict[str, tuple[int, int, bool]] = {}
    for a in adapters:
        for module in a.modules:
            shape = seen.setdefault(module, _update_shape(a, module))
            if _update_shape(a, module) != shape:
                raise InvalidArgument(
                    "this module has another shape than in the other adapters; are they of one base?", a.path, module
                )


def knots_ties(
    lefts: list[torch.Tensor], rights: list[torch.Tensor], params: Params, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """TIES on the KnOTS-aligned V_iᵀ of the updates L_i·R_i (coefficients already in L_i): the
    merged update as (UΣ, V_mergedᵀ)."""
    q, k = torch.linalg.qr(torch.cat(lefts, 1))
    blocks, start = [], 0
    for left, right in zip(lefts, rights):
        blocks.append(k[:, start : start + left.shape[1]] @ right)  # Q·(that block) = L_i R_i
        start += left.shape[1]
    u, s, vh = torch.linalg.svd(torch.cat(blocks, 1), full_matrices=False)
    n = rights[0].shape[1]
    rank = numerical_rank(s, (q.shape[0], vh.shape[1]))  # of [c_1τ_1, …, c_Nτ_N], m × N·n
    u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    v_blocks = [vh[:, i * n : (i + 1) * n] for i in range(len(rights))]
    ones = torch.ones(len(v_blocks), dtype=s.dtype)
    merged = ties(torch.zeros_like(v_blocks[0]), v_blocks, ones, params, lambda i: generator)
    return (q @ u) * s, merged


def tsv_of_factors(
    lefts: list[torch.Tensor], rights: list[torch.Tensor], tasks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """TSV-M from the factors: each update's exact SVD (`lowrank_svd`), its top min(r_i, ⌊min(m, n)/N⌋)
    non-zero triplets kept, then `tsv_factors`. Dense TSV keeps ⌊min(m, n)/N⌋ per task, padding a
    rank-r_i update with arbitrary null directions when r_i is smaller; here only real ones."""
    keep = max(1, min(lefts[0].shape[0], rights[0].shape[1]) // tasks)
    parts = []
    for left, right in zip(lefts, rights):
        svd = lowrank_svd(left, right)
        parts.append(svd.truncate(min(keep, numerical_rank(svd.S, (left.shape[0], right.shape[1])))))
    return tsv_factors([p for p in parts if p.S.numel()])


def core_space(
    lefts: list[torch.Tensor], rights: list[torch.Tensor], method: MergeMethod, params: Params, generator: Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """`method` on the updates L_i·R_i in their core space (Panariello et al. 2025, §3, eq. 4-6):
    the merged update as (U_ref·M, V_refᵀ), of rank at most Σr_i, never forming an m × n matrix."""
    u_ref = torch.linalg.qr(torch.cat(lefts, 1))[0]
    v_ref = torch.linalg.qr(torch.cat(rights).mT)[0]
    cores = [(u_ref.mT @ left) @ (right @ v_ref) for left, right in zip(lefts, rights)]
    zero = torch.zeros_like(cores[0])
    merged = method.fn(zero, cores, torch.ones(len(cores), dtype=zero.dtype), params, generator)
    return u_ref @ merged, v_ref.mT.contiguous()


def _is_zero(left: torch.Tensor, right: torch.Tensor) -> bool:
    return not bool(left.any()) or not bool(right.any())


def factored_norm(left: torch.Tensor, right: torch.Tensor) -> float:
    """‖L·R‖_F from the factors: ‖LR‖² = Σ (LᵀL) ⊙ (RRᵀ), r × r matrices, never m × n."""
    return float(((left.mT @ left) * (right @ right.mT)).sum().clamp_min(0).sqrt())


def merge_adapters(
    adapters: list[LoraAdapter],
    method: str,
    coefficients: list[float],
    params: Params,
    max_rank: int | None = None,
    seed: int = 0,
    base: Checkpoint | None = None,
    auto: bool = False,
) -> MergedAdapter:
    """Every module any adapter changes, merged by `method` into LoRA factors at scale 1, and the
    tensors of saved modules merged against `base` (needed when an adapter saves any). `auto`:
    λ per tensor by `run.auto_lambda`'s rule, from the factors (`params` then hold λ = 1)."""
    if method not in adapter_methods():
        raise InvalidArgument(
            f"--as-adapter merges with {', '.join(adapter_methods())}; {method} does not merge task vectors "
            "against a base (merge without --as-adapter, or extract-lora afterwards)"
        )
    check_adapters(adapters)
    c = torch.tensor(coefficients, dtype=torch.float64)
    if method == "average":
        c, lam = c / c.sum(), 1.0
    else:
        lam = params.as_dict().get("lam", 1.0)
    generator = torch.Generator().manual_seed(seed)
    dense = METHODS[method]
    out = []
    lambdas: dict[str, float] = {}
    for module in sorted({m for a in adapters for m in a.modules}):
        sources = [i for i, a in enumerate(adapters) if module in a.modules]
        lefts, rights = [], []
        for i in sources:
            left, right, scale = adapters[i].matrix_factors(module, dtype=torch.float64)
            if not _is_zero(left * (scale * float(c[i])), right):  # no update: no direction
                lefts.append(left * (scale * float(c[i])))
                rights.append(right)
        bias = _merged_bias(adapters, sources, module, dense, c, params, generator, lambdas if auto else None)
        moved = bias is not None and bool(bias.any())
        if not lefts and not moved:
            continue
        if not lefts:  # only the bias moves: B = 0 carries it
            rows, cols, _ = _update_shape(adapters[sources[0]], module)
            left, right = torch.zeros(rows, 1, dtype=torch.float64), torch.zeros(1, cols, dtype=torch.float64)
        elif method == "ties":
            left, right = knots_ties(lefts, rights, params, generator)
        elif method == "tsv":
            left, right = tsv_of_factors(lefts, rights, len(adapters))
            left = left * lam
        elif method in ("task-arithmetic", "average"):
            left, right = torch.cat(lefts, 1) * lam, torch.cat(rights)
        else:
            generators = lambda i, module=module: torch.Generator().manual_seed(tensor_seed(seed, module, i))
            left, right = core_space(lefts, rights, dense, params, generators)
        if auto and lefts:
            summed = factored_norm(torch.cat(lefts, 1), torch.cat(rights))
            lam_auto = auto_lambda(factored_norm(left, right), summed, coefficients)
            lambdas[adapters[sources[0]].modules[module].weight_name] = lam_auto
            left = left * lam_auto
        if max_rank is not None and left.shape[1] > max_rank:
            svd = lowrank_svd(left, right).truncate(max_rank)
            left, right = svd.U * svd.S, svd.Vh
        if _is_zero(left, right):
            if not moved:
                continue  # the method cancelled every direction
            left, right = left.new_zeros(left.shape[0], 1), right.new_zeros(1, right.shape[1])
        embedding = adapters[sources[0]].modules[module].embedding
        out.append(
            MergedModule(
                module,
                LoraFactors(a=right.float().contiguous(), b=left.float().contiguous(), embedding=embedding, bias=bias),
                sources,
            )
        )
    saved, left_out = _merged_saved(adapters, base, dense, c, params, seed, lambdas if auto else None)
    if not out and not saved:
        raise InvalidArgument(
            "the merged adapter would change nothing: every adapter's update is zero (B = 0, PEFT's "
            "default initialisation, or a zero weight) or the method cancelled them all; nothing "
            "was written",
            adapters[0].path,
        )
    return MergedAdapter(out, saved, left_out, lambdas)


def _merged_bias(
    adapters: list[LoraAdapter],
    sources: list[int],
    module: str,
    method: MergeMethod,
    c: torch.Tensor,
    params: Params,
    generator: torch.Generator,
    lambdas: dict[str, float] | None = None,
) -> torch.Tensor | None:
    """The merged LoRA bias of a module (lora_bias), at scale 1: the dense method on the bias task
    vectors s_i·b_i (zero for the adapters that do not adapt the module); None without lora_bias.
    With `lambdas`, λ auto for it, recorded there."""
    info = adapters[sources[0]].modules[module]
    if info.bias is None:
        return None
    deltas = {i: adapters[i].bias_delta(module, dtype=torch.float64) for i in sources}
    zero = torch.zeros_like(deltas[sources[0]])
    taus = [deltas.get(i, zero) for i in range(len(adapters))]
    merged = method.fn(zero, taus, c, params, lambda i: generator)
    if lambdas is not None:
        merged = merged * _auto(lambdas, info.bias_name, zero, taus, merged, c)
    return merged.float()


def _auto(
    lambdas: dict[str, float],
    name: str,
    base: torch.Tensor,
    thetas: list[torch.Tensor],
    merged: torch.Tensor,
    c: torch.Tensor,
) -> float:
    """λ auto of one dense tensor (`run.auto_lambda`), recorded in `lambdas` under `name`."""
    coeffs = c.tolist()
    lam = auto_lambda(float((merged - base).norm()), weighted_sum_norm([t - base for t in thetas], coeffs), coeffs)
    lambdas[name] = lam
    return lam


def _merged_saved(
    adapters: list[LoraAdapter],
    base: Checkpoint | None,
    method: MergeMethod,
    c: torch.Tensor,
    params: Params,
    seed: int,
    lambdas: dict[str, float] | None = None,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Tensors of saved modules merged by the dense method against the base's tensor (in the saved
    dtype), by their name in the adapters; an adapter that does not save one leaves the base's
    there. A saved tensor the base lacks (a new head) is left out, as the dense merge leaves out
    tensors only some models have: the second value lists them."""
    if not any(a.saved for a in adapters):
        return {}, []
    if base is None:
        raise InvalidArgument(
            "the adapters save whole modules (modules_to_save): give --base to merge those tensors",
            next(a.path for a in adapters if a.saved),
        )
    adapted = [AdaptedCheckpoint(base, a) for a in adapters]
    out, left_out = {}, []
    for target in sorted({n for ft in adapted for n in ft.saved_of}):
        owner = next(ft for ft in adapted if target in ft.saved_of)
        name = owner.saved_of[target]
        if target not in base:
            left_out.append(name)
            continue
        for ft in adapted:
            if tuple(ft.info(target).shape) != tuple(base.info(target).shape):
                raise ShapeMismatch(
                    f"saved as {list(ft.info(target).shape)} but the base has "
                    f"{list(base.info(target).shape)}; resize or drop it before merging",
                    ft.path,
                    target,
                )
        generators = lambda i, name=name: torch.Generator().manual_seed(tensor_seed(seed, name, i))
        w0 = base.get(target, dtype=torch.float64)
        thetas = [ft.get(target, dtype=torch.float64) for ft in adapted]
        merged = method.fn(w0, thetas, c, params, generators)
        if lambdas is not None:
            merged = w0 + _auto(lambdas, target, w0, thetas, merged, c) * (merged - w0)
        out[name] = merged.to(torch_dtype(owner.adapter.saved[name].dtype, owner.path, name))
    return out, left_out


def merge_as_adapter(
    config: MergeConfig, out_dir: str | Path | None, *, opened: Mapping[str, Any] | None = None
) -> tuple[MergeReport, NewAdapter]:
    """Merge `config.models` (PEFT LoRA adapters of `config.base`) into one adapter, written to the
    folder `out_dir` with `weightlab_merge.yml` in it to make it again (None: not written).
    `opened` holds models already open (in memory) by the names the config gives them."""
    started = time.perf_counter()
    opened = opened or {}
    if not config.as_adapter:
        config = replace(config, as_adapter=True)
    adapters: list[LoraAdapter] = []
    for path in config.models:
        model = opened[path] if path in opened else open_checkpoint(path)
        if not isinstance(model, LoraAdapter):
            raise InvalidArgument("--as-adapter merges PEFT LoRA adapters; this is a checkpoint", path)
        adapters.append(model)
    base = open_base(config, opened)
    if base is not None:
        for a in adapters:
            AdaptedCheckpoint(base, a)  # refuses a module the base lacks, or of another shape
    weights = config.weights or [1.0] * len(adapters)
    merged = merge_adapters(
        adapters, config.method, weights, config.resolved, config.max_rank, config.seed, base, config.auto_lambda
    )
    adapter = NewAdapter(
        {m.name: m.factors for m in merged.modules},
        1.0,
        (config.base if config.base not in opened else None) or adapters[0].base_model_name_or_path,
        bool(adapters[0].adapter_config.get("fan_in_fan_out")),
        merged.saved,
    )
    if out_dir is not None:
        adapter.write(out_dir, files={RECORD: record_yaml(config)})
    report = MergeReport(
        config,
        "in memory" if out_dir is None else str(out_dir),
        len(merged.modules) + len(merged.saved),
        [],
        merged.left_out,
        weights,
        seconds=time.perf_counter() - started,
        auto_lambda=merged.auto_lambda,
    )
    return report, adapter
