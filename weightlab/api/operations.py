"""The operations that make a model, as Python functions: `merge`, `init_lora`, `extract_lora`,
`mitigate_intruders`. With `out=` each writes exactly what its command writes and returns the
record of what was done; without, the model stays in memory: a merged `StateDict` (or the
module given as `into=`, loaded with it) or a `NewAdapter` (`.to_peft(model)`), each with the
record as `.report`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from weightlab.api.analyses import many
from weightlab.api.frame import Run, api_function, emit, with_record
from weightlab.domains import SEED
from weightlab.errors import CheckpointNotFound, InvalidArgument
from weightlab.io.sources import Source, Sources, describe, is_in_memory
from weightlab.options import IntruderOptions, LoraInitOptions, NanOptions, RankBudget, SlimExpertsOptions

if TYPE_CHECKING:
    import torch

    from weightlab.io.adapter_writer import NewAdapter
    from weightlab.io.outputs import OutputPlan
    from weightlab.results import Result

OPERATION = ("device", "threads", "ray", "ray_timeout", "json", "report", "force")
_OUT = {
    "out": "-o",
    "residual_out": "--residual-out",
    "no_residual": "--no-residual",
    "as_plain_lora": "--as-plain-lora",
}


def _finish(plan: OutputPlan, result: Result, product: NewAdapter | None, out: str | Path | None) -> None:
    """The product (an adapter) written with the result as its sidecar, when there is a folder
    for it; then the result's JSON and report."""
    if product is not None and out is not None:
        product.write(plan.path("-o"), sidecar=result.to_dict())
    emit(plan, result)


def _base_name(source: object) -> str | None:
    """What an adapter names as its base (`base_model_name_or_path`): the path or Hub ID, none for a model in memory."""
    return None if is_in_memory(source) else str(source)


def _names(sources: Sequence[Source]) -> tuple[list[str], dict[str, Any]]:
    """Each model's name in a merge config (its path as given, or an in-memory label made
    unique), and the in-memory ones opened by that name."""
    from weightlab.io.open import open_checkpoint

    names, opened = [], {}
    for source in sources:
        name = describe(source)
        if is_in_memory(source):
            while name in opened or name in names:
                name += "'"
            opened[name] = open_checkpoint(source)
        names.append(name)
    return names, opened


@api_function(
    OPERATION,
    flags={
        **_OUT,
        "lam": "--lambda",
        "weights": "--weights",
        "max_rank": "--max-rank",
        "match_experts": "--match-experts",
        "calibration": "--calibration",
        "tokenizer": "--tokenizer",
        "dry_run": "--dry-run",
    },
)
def merge(
    base: Source | None = None,
    models: Sources | None = None,
    *,
    method: str | None = None,
    weights: Sequence[float] | None = None,
    coeff: str | None = None,
    lam: float | str | None = None,
    density: float | None = None,
    calibration: str | Path | Sequence[str | Path] | None = None,
    tokenizer: str | Path | None = None,
    svc: bool = False,
    lines: bool = False,
    seed: int | None = None,
    dtype: str | None = None,
    config: str | Path | None = None,
    donor: str | Path | None = None,
    shard_size: str | None = None,
    as_adapter: bool = False,
    max_rank: int | None = None,
    match_experts: bool = False,
    out: str | Path | None = None,
    into: torch.nn.Module | None = None,
    dry_run: bool = False,
    params: Mapping[str, float | str] | None = None,
    nan: NanOptions,
    run: Run,
    **method_params: float,
) -> Any:
    """Merge fine-tunes of one base, streaming tensor by tensor, with manual or NAN coefficients.

    Parameters
    ----------
    base : a model (path, Hub ID, module, mapping), optional
        The base: task vectors are τ_i = θ_i − θ_base (methods without a base take None).
    models : list of models, or a dict: name -> model
        The fine-tunes (with ``as_adapter=True``: LoRA adapters or PeftModels of `base`).
    method : str
        One of ``weightlab.merging.METHODS`` (task-arithmetic, ties, dare-ties, iso-cts, …).
    weights : list of float, optional
        A coefficient per model (default 1 each).
    coeff : {"manual", "nan"}, optional
        NAN sets the coefficients from inverse parameter norms (the ``nan_*`` options).
    lam, density : float, optional
        The method's λ and density; any other parameter of the method by its name (``gamma=0.05``).
        ``lam="auto"`` chooses λ per tensor from the task vectors (docs/merge.md).
    calibration : path or list of paths, optional
        Unlabeled text for the data-aware methods (regmean, regmean++, fisher): one file for all
        models or one per model; one text per line, or a .jsonl of ``{"text": ...}``.
    tokenizer : path, optional
        The tokenizer folder for the calibration text (default: the first input that has one).
    params : mapping, optional
        The method's parameters by name, as ``--param NAME=VALUE`` gives them (``{"lambda": 0.5}``).
    svc, lines : bool
        Then recalibrate singular values (SVC) / scale each layer's update by depth (LiNeS).
    seed : int, optional
        Seed of DARE's random drops.
    dtype : str, optional
        The output's dtype (default: the base's).
    config : path, optional
        A YAML merge config (ours or mergekit's); keywords given here override it.
    donor : path, optional
        Copy config and tokenizer files from here (default: the base's folder; a module's own config).
    shard_size : str, optional
        Largest output shard, e.g. "2GB".
    as_adapter : bool
        The models are LoRA adapters: the result is an adapter (task arithmetic exact; TIES/TSV in their
        joint space; every other method of task vectors in the adapters' core space).
    max_rank : int, optional
        With ``as_adapter``: keep each module's best rank-k update.
    match_experts : bool
        Mixture-of-Experts models whose experts are not in the same order: each model's experts are
        matched to the base's (else the first model's) per MoE block, by the cosine of their weights
        (Hungarian method), and read in that order, router rows with them (command line: --match-experts).
    out : path, optional
        Write the merged model into this folder, as ``weightlab merge -o`` does.
    into : torch.nn.Module, optional
        Without `out`: load the merged weights into this module (strictly) and return it.
    dry_run : bool
        Compute nothing and write no model: return the plan (`MergePlan`: bytes to read and
        write, shards, estimated peak memory, free space where `out` would go).
    {options}

    Returns
    -------
    MergePlan with `dry_run`; MergeReport with `out`; else a `StateDict` (the merged tensors,
    ``.report`` the record), the module `into` with the merged weights, or with ``as_adapter`` a
    `NewAdapter`.

    References
    ----------
    Each method's paper is in its registry entry (``weightlab merge --help``, docs/merge.md).
    """
    from weightlab.merging.config import build_config
    from weightlab.merging.recipes import load_config
    from weightlab.merging.stages import load_stages

    stages = load_stages(config) if config else None
    if stages is not None:
        return _merge_stages(
            stages, config, base, models, out, into, dry_run, run, has_method_params=bool(method_params)
        )
    options: dict[str, Any] = load_config(config) if config else {}
    options["param_values"] = {
        **options.get("param_values", {}),
        **{k: v for k, v in {"lambda": lam, "density": density}.items() if v is not None},
        **method_params,
        **(params or {}),
    }
    overrides = {
        "method": method,
        "weights": None if weights is None else [float(w) for w in weights],
        "coeff": coeff,
        "seed": seed,
        "dtype": dtype,
        "shard_size": shard_size,
        "donor": None if donor is None else str(donor),
        "max_rank": max_rank,
        "as_adapter": as_adapter or None,
        "match_experts": match_experts or None,
        "calibration": None
        if calibration is None
        else [str(c) for c in ([calibration] if isinstance(calibration, (str, Path)) else calibration)],
        "tokenizer": None if tokenizer is None else str(tokenizer),
    }
    options.update({k: v for k, v in overrides.items() if v is not None})
    sources = many(models) or None
    names, opened = _names(([base] if base is not None else []) + (sources or []))
    if base is not None:
        options["base"] = names[0]
    if sources:
        options["models"] = names[1:] if base is not None else names
    options["modifiers"] = [
        *options.get("modifiers", []),
        *(m for m, on in (("svc", svc), ("lines", lines)) if on and m not in options.get("modifiers", [])),
    ]
    nan_given = {f: getattr(nan, f) for f in ("norm_of", "granularity", "power", "normalize") if f in run.given}
    if nan_given:
        options["nan"] = replace(options.get("nan", NanOptions()), **nan_given)
    if "method" not in options or not options.get("models"):
        raise InvalidArgument("give --method and the models to merge (on the command line or in --config)")
    if into is not None and out is not None:
        raise InvalidArgument("into= loads the merged model into a module; out= writes it: give one")
    run.refuse_unless(
        not as_adapter,
        "loads a merged model into a module; as_adapter=True makes an adapter (load it with .to_peft(model))",
        "into",
        flags={"into": "into="},
    )
    cfg = build_config(options)
    if nan_given and cfg.coeff != "nan":
        raise InvalidArgument("--nan-* options need --coeff nan (or --method nan)")
    run.refuse_unless(cfg.spec.random, f"seeds random drops; {cfg.method} draws nothing at random", "seed")
    run.refuse_unless(
        not cfg.as_adapter,
        "does not apply to --as-adapter (the adapters' small factors are merged on this machine's CPU in float64)",
        "device",
        "ray",
        "ray_timeout",
        "threads",
    )
    if cfg.donor is not None and not Path(cfg.donor).exists():
        raise CheckpointNotFound("--donor: no such file or folder", cfg.donor)
    inputs = [s for s in (cfg.base, *cfg.models, config, cfg.donor, *(cfg.calibration or [])) if s not in opened]
    if dry_run:
        return _plan(cfg, inputs, opened, out, into, run)
    with run.outputs([*inputs, *opened.values()], out_dir=out) as plan:
        from weightlab.io.memory import StateDictWriter
        from weightlab.merging import merge as run_merge
        from weightlab.merging.adapters import merge_as_adapter

        if cfg.as_adapter:  # LoRA adapters of one base in, one LoRA adapter out
            report, adapter = merge_as_adapter(cfg, plan.path("-o") if out is not None else None, opened=opened)
            product: Any = adapter
        else:
            target = plan.path("-o") if out is not None else StateDictWriter("merged")
            with run.progress(f"merge ({cfg.method})", "tensors") as (on_start, on_progress):
                report = run_merge(
                    cfg,
                    target,
                    opened=opened,
                    compute=run.compute(),
                    on_progress=on_progress,
                    on_start=on_start,
                    progress=run.progress,
                )
            product = target.state if isinstance(target, StateDictWriter) else None
        if out is not None:
            report.out = str(out)  # it was written to a staging path; this is where it lands
        emit(plan, report)
    if out is not None:
        return report
    with_record(product, report)
    if into is not None:
        from weightlab.io.memory import load_into

        load_into(into, product)  # all or nothing
        return into
    return product


SHAPING = ("method", "weights", "coeff", "lam", "density", "calibration", "tokenizer", "svc", "lines", "seed",
            "dtype", "donor", "shard_size", "as_adapter", "max_rank", "match_experts", "params", "norm_of",
            "granularity", "power", "normalize")  # fmt: skip


def _merge_stages(
    stages: list[Any],
    config: str | Path | None,
    base: Source | None,
    models: Sources | None,
    out: str | Path | None,
    into: Any,
    dry_run: bool,
    run: Run,
    has_method_params: bool,
) -> Any:
    """`merge(config=…)` with a recipe of several merges (`merging.stages`): each stage as the recipe
    says, the last into `out` (or memory, or `into`)."""
    from weightlab.io.memory import StateDictWriter, load_into
    from weightlab.merging.stages import run_stages

    reason = "does not apply to a recipe of several merges: each stage's options are in the recipe"
    run.refuse_unless(False, reason, *SHAPING, "dry_run")
    if base is not None or models is not None or has_method_params or dry_run:
        raise InvalidArgument(f"models and method parameters {reason[len('does not apply to ') :]}")
    if into is not None and out is not None:
        raise InvalidArgument("into= loads the merged model into a module; out= writes it: give one")
    names = {s.name for s in stages}
    if any(s.config.as_adapter for s in stages):
        raise InvalidArgument("a recipe of several merges merges full models, not --as-adapter", config)
    inputs = list(dict.fromkeys(m for s in stages for m in s.config.referenced() if m not in names))
    with run.outputs([config, *inputs], out_dir=out) as plan:
        target: Any = plan.path("-o") if out is not None else StateDictWriter("merged")
        with run.progress(f"merge ({len(stages)} stages)", "tensors") as (on_start, on_progress):
            report = run_stages(
                stages,
                target,
                Path(out).absolute().parent if out is not None else None,
                compute=run.compute(),
                on_start=on_start,
                on_progress=on_progress,
                progress=run.progress,
            )
        if out is not None:
            report.out = str(out)
        emit(plan, report)
    if out is not None:
        return report
    with_record(target.state, report)
    if into is not None:
        load_into(into, target.state)
        return into
    return target.state


def _plan(cfg: Any, inputs: list[Any], opened: dict[str, Any], out: str | Path | None, into: object, run: Run) -> Any:
    """`merge --dry-run`: the plan of a checkpoint merge, its outputs checked; no model written."""
    from weightlab.io.outputs import Output, check_outputs
    from weightlab.merging.plan import plan_merge

    if cfg.as_adapter or into is not None:
        raise InvalidArgument("--dry-run plans a checkpoint written with -o (adapters are merged small, in memory)")
    if out is not None:
        check_outputs(inputs, [Output("-o", out, directory=True)], run.force)
    with run.outputs([*inputs, *opened.values()]) as plan:
        result = plan_merge(cfg, str(out) if out is not None else ".", opened, run.compute())
        emit(plan, result)
    return result


@api_function(OPERATION, flags={**_OUT, "tsd": "--tsd", "source": "--from", "base": "BASE", "initial": "--initial"})
def init_lora(
    base: Source | None = None,
    *,
    tsd: bool = False,
    source: Source | None = None,
    targets: str = "all-linear",
    rank_budget: int | None = None,
    rank_allocation: str = "energy",
    out: str | Path | None = None,
    residual_out: str | Path | None = None,
    no_residual: bool = False,
    as_plain_lora: Source | None = None,
    initial: Source | None = None,
    options: LoraInitOptions,
    run: Run,
) -> Any:
    """Initialise a LoRA from the base's singular directions (LoRA-Init from TSDs, PiSSA, MiLoRA).

    Parameters
    ----------
    base : a model (path, Hub ID, module, mapping)
        The base to initialise the LoRA from.
    tsd : bool
        Short for ``method="tsd"``.
    source : a model, optional
        tsd: the fine-tune or warm-up adapter giving ΔW (command line: --from).
    targets : str
        Module suffixes ("q_proj,v_proj"), a regex, or "all-linear".
    rank_budget : int, optional
        A total rank over all targets instead of `rank`, shared by their spectra (scale 1).
    rank_allocation : {"energy", "entropy"}
        How `rank_budget` is shared.
    out : path, optional
        Write the adapter here (and the residual base to `residual_out`), as ``weightlab init-lora -o``.
    residual_out : path, optional
        Where the residual base goes (with `out`; or ``no_residual=True``).
    no_residual : bool
        Make only the adapter.
    as_plain_lora, initial : models, optional
        Convert the trained adapter `as_plain_lora` (initialised as `initial`) into a plain LoRA of the unmodified base.
    {options}

    Returns
    -------
    LoraInitReport with `out`; else a `NewAdapter` (``.to_peft(model)``, ``.state_dict()``) with the
    record as ``.report`` and the residual base's tensors as ``.residual``.

    References
    ----------
    Meng et al. 2024, "PiSSA", NeurIPS (W = U_rS_rV_rᵀ + W_res, Sec. 3); Wang et al. 2025,
    "MiLoRA", NAACL (the minor components); Si et al. 2025, ICLR (LoRA-Init from TSDs).
    """
    run.refuse_unless(
        as_plain_lora is None,
        "does not apply to --as-plain-lora (it converts a trained adapter as it is, computing nothing to report)",
        "base",
        "rank",
        "method",
        "tsd",
        "source",
        "targets",
        "alpha",
        "svd",
        "seed",
        "rank_budget",
        "rank_allocation",
        "residual_out",
        "no_residual",
        "device",
        "threads",
        "ray",
        "ray_timeout",
        "json",
        "report",
    )
    run.refuse_unless(
        as_plain_lora is not None, "is the adapter --as-plain-lora converts: it needs --as-plain-lora", "initial"
    )
    run.refuse_unless(not no_residual, "and --no-residual contradict each other", "residual_out")
    run.refuse_unless(not tsd, "and --tsd both choose the method; use one", "method")
    run.refuse_unless(
        tsd or options.method == "tsd",
        "gives the warm-up update of --method tsd; the other methods use the base alone",
        "source",
    )
    run.refuse_unless(
        options.svd == "randomized", "seeds only --svd randomized (the exact SVD has no randomness)", "seed"
    )
    run.refuse_unless(
        rank_budget is None, "does not apply with --rank-budget (each module's rank comes from the budget)", "rank"
    )
    run.refuse_unless(
        rank_budget is not None, "says how --rank-budget is shared: it needs --rank-budget", "rank_allocation"
    )
    run.refuse_unless(
        out is not None, "is where the residual goes beside out=; without out= it comes back in memory", "residual_out"
    )
    if as_plain_lora is not None:
        return _to_plain_lora(as_plain_lora, initial, out, run)
    if base is None:
        raise InvalidArgument("give the BASE checkpoint")
    options = replace(options, method="tsd") if tsd else options
    budget = RankBudget(rank_budget, rank_allocation) if rank_budget is not None else None
    if out is not None and residual_out is None and not no_residual:
        raise InvalidArgument(
            "this adapter only reproduces the model on the residual base: give --residual-out DIR, "
            "or --no-residual if you will build the residual yourself"
        )
    with run.outputs([base, source], out_dir=out, residual_out_dir=residual_out) as plan:
        from weightlab.io import CheckpointWriter, open_finetuned, open_weights
        from weightlab.io.memory import StateDictWriter, config_files, donor_of
        from weightlab.io.writer import stored_plan
        from weightlab.surgery.lora import init_lora as run_init
        from weightlab.surgery.targets import resolve_targets

        compute = run.compute()
        base_ckpt = open_weights(base)
        names = resolve_targets(base_ckpt, targets)
        ft = open_finetuned(source, base_ckpt) if source is not None else None
        writer: Any = None
        if residual_out is not None:
            writer = CheckpointWriter(
                plan.path("--residual-out"),
                donor=donor_of(base_ckpt),
                plan=stored_plan(base_ckpt),
                metadata={"weightlab": f"residual of init-lora {options.method} r={options.rank}"},
                files=config_files(base_ckpt),
            )
        elif out is None and not no_residual:
            writer = StateDictWriter("residual").planned(stored_plan(base_ckpt))
        named_base = str(residual_out) if residual_out is not None else _base_name(base)
        with (
            run.progress(f"init-lora ({options.method})", "modules") as (on_start, on_progress),
            writer or nullcontext(),
        ):
            on_start(len(names))
            result, adapter = run_init(base_ckpt, names, options, ft, writer, compute, on_progress, budget, named_base)
        _finish(plan, result, adapter, out)
    if out is not None:
        return result
    adapter.residual = writer.state if writer is not None else None
    return with_record(adapter, result)


def _to_plain_lora(trained: Source, initial: Source | None, out: str | Path | None, run: Run) -> Any:
    """`init_lora(as_plain_lora=…, initial=…)`: a trained adapter as a plain LoRA of the unmodified base."""
    if initial is None:
        raise InvalidArgument("--as-plain-lora needs --initial (the adapter as init-lora wrote it)")
    with run.outputs([trained, initial], out_dir=out) as plan:
        from weightlab.io import LoraAdapter, open_checkpoint
        from weightlab.surgery.lora import to_plain_lora

        adapters = open_checkpoint(trained), open_checkpoint(initial)
        if not all(isinstance(a, LoraAdapter) for a in adapters):
            raise InvalidArgument("--as-plain-lora and --initial take PEFT adapter folders", describe(trained))
        plain = to_plain_lora(*adapters)
        if out is not None:
            plain.write(plan.path("-o"), sidecar={"converted_from": describe(trained), "initial": describe(initial)})
    return plain


@api_function(OPERATION, flags={**_OUT, "rank": "--rank", "energy": "--energy", "rank_budget": "--rank-budget"})
def extract_lora(
    base: Source,
    finetuned: Source,
    *,
    rank: int | None = None,
    energy: float | None = None,
    rank_budget: int | None = None,
    rank_allocation: str = "energy",
    targets: str = "all-linear",
    out: str | Path | None = None,
    run: Run,
) -> Any:
    """Approximate each ΔW = W_ft − W_base by its truncated SVD, as a PEFT LoRA adapter.

    Parameters
    ----------
    base : a model (path, Hub ID, module, mapping)
    finetuned : a fine-tune (or adapter, PeftModel) of `base`
    rank : int, optional
        One rank for every module.
    energy : float, optional
        Per-module rank keeping this share of ‖ΔW‖²_F (e.g. 0.9).
    rank_budget : int, optional
        A total rank over all targets, shared by the spectra of their ΔW.
    rank_allocation : {"energy", "entropy"}
        How `rank_budget` is shared.
    targets : str
        Module suffixes ("q_proj,v_proj"), a regex, or "all-linear".
    out : path, optional
        Write the adapter into this folder, as ``weightlab extract-lora -o``.
    {options}

    Returns
    -------
    LoraExtractReport with `out`; else a `NewAdapter` (``.to_peft(model)``) with the record as ``.report``.

    References
    ----------
    Eckart & Young 1936, Psychometrika 1(3) (the best rank-r approximation is the truncated SVD).
    """
    run.refuse_unless(
        rank_budget is not None, "says how --rank-budget is shared: it needs --rank-budget", "rank_allocation"
    )
    with run.outputs([base, finetuned], out_dir=out) as plan:
        from weightlab.io import open_finetuned, open_weights
        from weightlab.surgery.lora import extract_lora as run_extract
        from weightlab.surgery.targets import resolve_targets

        compute = run.compute()
        base_ckpt = open_weights(base)
        ft = open_finetuned(finetuned, base_ckpt)
        names = resolve_targets(base_ckpt, targets)
        budget = RankBudget(rank_budget, rank_allocation) if rank_budget is not None else None
        with run.progress("extract-lora", "modules") as (on_start, on_progress):
            on_start(len(names))
            result, adapter = run_extract(
                base_ckpt, ft, names, rank, energy, compute, on_progress, budget, describe(base)
            )
        _finish(plan, result, adapter, out)
    return result if out is not None else with_record(adapter, result)


@api_function((*OPERATION, "plots"), flags=_OUT)
def mitigate_intruders(
    base: Source, finetuned: Source, *, out: str | Path | None = None, options: IntruderOptions, run: Run
) -> Any:
    """Scale the intruder dimensions of a fine-tune by λ, to undo forgetting.

    Parameters
    ----------
    base : a model (path, Hub ID, module, mapping)
    finetuned : a fine-tune, PeftModel or adapter of `base`
    out : path, optional
        Write the result here, as ``weightlab mitigate-intruders -o``.
    {options}

    Returns
    -------
    IntruderReport with `out`; else, for a dense fine-tune, a `StateDict` (only matrices with
    intruders differ), for an adapter a `NewAdapter` (its rank grows by each module's intruders),
    with the record as ``.report``.

    References
    ----------
    Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence"
    (W' + (λ−1)Σ_{intruders} σ'u'v'ᵀ, Sec. 6; PEFT's reduce_intruder_dimension).
    """
    with run.outputs([base, finetuned], out_dir=out) as plan:
        from weightlab.io import open_finetuned, open_weights
        from weightlab.io.adapter import AdaptedCheckpoint
        from weightlab.io.experts import per_expert
        from weightlab.io.memory import StateDictWriter, config_files, donor_of
        from weightlab.io.writer import CheckpointWriter, stored_plan
        from weightlab.surgery.intruders import mitigate_intruders as run_mitigate

        compute = run.compute()
        base_ckpt = per_expert(open_weights(base))  # fused experts as matrices, written as transformers saves them
        ft = per_expert(open_finetuned(finetuned, base_ckpt))
        writer: Any = None
        if not isinstance(ft, AdaptedCheckpoint):
            writer = (
                CheckpointWriter(
                    plan.path("-o"),
                    donor=donor_of(ft),
                    plan=stored_plan(ft),
                    metadata={"weightlab": f"intruders scaled by {options.scale:g}"},
                    files=config_files(ft),
                )
                if out is not None
                else StateDictWriter("mitigated").planned(stored_plan(ft))
            )
        with run.progress("mitigate-intruders", "matrices") as (on_start, on_progress), writer or nullcontext():
            result, adapter = run_mitigate(
                base_ckpt,
                ft,
                str(out) if out is not None else "in memory",
                options,
                writer,
                compute,
                on_progress,
                on_start,
            )
        _finish(plan, result, adapter, out)
    if out is not None:
        return result
    return with_record(adapter if adapter is not None else writer.state, result)


@api_function(
    ("threads", "json", "report", "force"),
    flags={**_OUT, "calibration": "--calibration", "tokenizer": "--tokenizer"},
)
def slim_experts(
    model: Source,
    *,
    out: str | Path | None = None,
    calibration: str | Path | None = None,
    tokenizer: str | Path | None = None,
    options: SlimExpertsOptions,
    run: Run,
) -> Any:
    """Slim a Mixture-of-Experts model to K experts per MoE block, from its weights alone: merge
    each group of alike experts into their mean (HC-SMoE's clustering, on the weights), or prune
    the experts most like another; the router rows follow, the config says K.

    Parameters
    ----------
    model : an MoE model (path, Hub ID, module, mapping)
        Per-expert or fused expert tensors alike (`weightlab experts` shows how alike they are).
    out : path
        The slimmed model's folder (command line: -o); transformers loads it as is.
    calibration : path, optional
        Text to run the model on (one text per line, or JSONL): pruning then keeps the experts of
        highest REAP saliency, merging weighs each expert by how often it is routed to
        (command line: --calibration).
    tokenizer : path, optional
        The tokenizer folder for `calibration` (default: the model's own; command line: --tokenizer).
    {options}

    Returns
    -------
    SlimReport
        Per block: the groups merged or the experts dropped, and the mean cosine within each group.

    References
    ----------
    Chen et al. 2025, "Retraining-Free Merging of Sparse MoE via Hierarchical Clustering" (HC-SMoE);
    Lasby et al. 2025, "REAP the Experts: Why Pruning Prevails for One-Shot MoE Compression" (REAP).
    """
    run.refuse_unless(calibration is not None, "applies to --calibration only", "tokenizer")
    if out is None:
        raise InvalidArgument("slim_experts: give out=, the folder of the slimmed model (its config changes too)")
    with run.outputs([model, calibration, tokenizer], out_dir=out) as plan:
        from weightlab.io.memory import config_files, config_text, donor_of
        from weightlab.io.open import open_weights
        from weightlab.io.writer import CheckpointWriter
        from weightlab.surgery.slim_experts import plan_slimming, slimmed_tensors
        from weightlab.surgery.slim_experts import slim_experts as run_slim

        ckpt = open_weights(model)
        routes = None
        if calibration is not None:
            import torch

            from weightlab.compute.activations import find_tokenizer
            from weightlab.compute.routing import routing
            from weightlab.io.calibration import read_calibration
            from weightlab.io.experts import per_expert

            texts = read_calibration(calibration)
            chosen = find_tokenizer([ckpt], None if tokenizer is None else str(tokenizer))
            routes = routing(per_expert(ckpt), texts, chosen, torch.device("cpu"))
        planned, counts = plan_slimming(ckpt, options, routes)
        assert ckpt.config is not None  # plan_slimming found the expert count in it
        shapes, _ = slimmed_tensors(ckpt, planned)
        files = {**config_files(ckpt), "config.json": config_text({**ckpt.config.raw, **counts})}
        writer = CheckpointWriter(
            plan.path("-o"),
            donor=donor_of(ckpt),
            plan=shapes,
            metadata={"weightlab": f"experts slimmed to {options.experts} per block ({options.by})"},
            files=files,
        )
        with run.progress("slim-experts", "tensors") as (on_start, on_progress), writer:
            if on_start:
                on_start(len(shapes))
            result = run_slim(ckpt, planned, counts, writer, str(out), options, on_progress)
        emit(plan, result)
    return result


@api_function(("threads", "json", "report", "force"), flags={**_OUT, "seed": "--seed", "tokenizer": "--tokenizer"})
def build_moe(
    recipe: str | Path | Mapping[str, Any],
    *,
    out: str | Path | None = None,
    seed: int = 0,
    tokenizer: str | Path | None = None,
    run: Run,
) -> Any:
    """Build a Mixture-of-Experts model from dense fine-tunes of one base, from a mergekit-moe
    recipe: each layer's MLP from each expert model, router rows from the prompts (`gate_mode`).

    Parameters
    ----------
    recipe : path of a mergekit-moe YAML file, or its mapping
        base_model, experts (source_model, positive_prompts, negative_prompts, noise_scale,
        residual_scale), gate_mode (hidden, hidden_avg, cheap_embed, random, uniform_random),
        experts_per_token, shared_experts, dtype, architecture.
    out : path
        The MoE's folder (command line: -o); transformers loads it as is.
    seed : int
        Seed of `random` and `uniform_random` router rows and of `noise_scale` (command line: --seed).
    tokenizer : path, optional
        The tokenizer folder for the prompts (default: the base's; command line: --tokenizer).
    {options}

    Returns
    -------
    BuildMoEReport

    References
    ----------
    Goddard et al. 2024, "Arcee's MergeKit: A Toolkit for Merging Large Language Models" (mergekit-moe).
    """
    if out is None:
        raise InvalidArgument("build_moe: give out=, the folder of the MoE")
    SEED.check("--seed", seed)  # the one seed domain every option with a seed declares
    from weightlab.io.yaml_file import read_yaml
    from weightlab.surgery.build_moe import parse_recipe

    path = str(recipe) if isinstance(recipe, (str, Path)) else "the recipe"
    parsed = parse_recipe(read_yaml(recipe) if isinstance(recipe, (str, Path)) else dict(recipe), path)
    random_rows = parsed.gate_mode in ("random", "uniform_random")
    noisy = any(e.noise_scale is not None for e in [*parsed.experts, *parsed.shared_experts])
    run.refuse_unless(not random_rows, f"does not apply: gate_mode {parsed.gate_mode} reads no prompt", "tokenizer")
    run.refuse_unless(random_rows or noisy, "does not apply: no random router rows and no noise_scale", "seed")
    models = [parsed.base_model, *(e.source_model for e in [*parsed.experts, *parsed.shared_experts])]
    inputs: list[Any] = [recipe if isinstance(recipe, (str, Path)) else None, tokenizer, *models]
    with run.outputs(inputs, out_dir=out) as plan:
        from weightlab.io.writer import CheckpointWriter
        from weightlab.surgery.build_moe import build_moe as run_build

        def writer_of(specs: Any, files: dict[str, str], donor: Any) -> CheckpointWriter:
            return CheckpointWriter(
                plan.path("-o"), donor=donor, plan=specs, metadata={"weightlab": "build-moe"}, files=files
            )

        result = run_build(parsed, path, Path(out), writer_of, seed, None if tokenizer is None else str(tokenizer))
        emit(plan, result)
    return result
