"""Merging with a little unlabeled data: RegMean, RegMean++ and Fisher merging.

`collect` runs the real models on the calibration texts (`compute/activations.py`) and keeps
per-model statistics on disk; the executor then merges tensor by tensor as for every method,
handing each method its tensor's statistics (`statistics=`). Tensors without statistics (biases,
norms, embeddings) are averaged, as the papers do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from weightlab.compute.activations import BATCH, Runner, StatisticsStore, find_tokenizer, gram_groups
from weightlab.compute.device import Compute
from weightlab.compute.progress import Callbacks, Reporter
from weightlab.io.calibration import CalibrationSet
from weightlab.io.checkpoint import Checkpoint
from weightlab.io.finite import require_finite_input
from weightlab.merging.covariance import regression_merge
from weightlab.merging.params import Generator, Params, Tensor
from weightlab.naming import layer_index


def shrink(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """RegMean's off-diagonal shrinkage: α·G + (1 − α)·diag(G) (Jin et al. 2023, §3.2)."""
    return alpha * gram + (1 - alpha) * torch.diag(torch.diagonal(gram))


def _mean(models: Sequence[Tensor], coeffs: Tensor | None = None) -> Tensor:
    if coeffs is None:
        return torch.stack(list(models)).mean(0)
    weights = coeffs / coeffs.sum()
    return sum((float(w) * m for w, m in zip(weights, models)), torch.zeros_like(models[0]))


def regmean(
    base: Tensor | None,
    models: Sequence[Tensor],
    coeffs: Tensor,
    p: Params,
    gen: Generator | None,
    statistics: tuple[bool, list[torch.Tensor]] | None = None,
) -> Tensor:
    """RegMean (Jin et al. 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models",
    ICLR, §3.1-3.2, eq. 2): per linear layer, the weights that best reproduce every model's outputs
    on its own inputs, W = (Σ_i W_i G̃_i)(Σ_i G̃_i)⁻¹ with G_i = X_iᵀX_i the Gram matrix of model i's
    inputs to that layer on its calibration texts and G̃_i = α·G_i + (1 − α)·diag(G_i); other
    tensors: the mean of the models. RegMean++ (Nguyen et al. 2025) is the same formula on Gram
    matrices of the inputs the merged model's earlier layers produce (`collect`)."""
    if statistics is None:
        return _mean(models)
    transposed, grams = statistics
    mats = [(m.mT if transposed else m).double() for m in models]
    merged = regression_merge(mats, [shrink(g.to(mats[0].device), p.alpha) for g in grams])
    return (merged.mT if transposed else merged).to(models[0].dtype)


def fisher(
    base: Tensor | None,
    models: Sequence[Tensor],
    coeffs: Tensor,
    p: Params,
    gen: Generator | None,
    statistics: tuple[bool, list[torch.Tensor]] | None = None,
) -> Tensor:
    """Fisher merging (Matena & Raffel 2022, "Merging Models with Fisher-Weighted Averaging",
    NeurIPS, eq. 4): θ = Σ_i c_iF_iθ_i / Σ_i c_iF_i per entry, F_i the diagonal Fisher information
    of model i on its calibration texts, floored at `floor`·mean(Σ_i c_iF_i) of the tensor so that
    entries no text moves are averaged; tensors without Fisher (buffers): Σ c_iθ_i / Σ c_i."""
    if statistics is None:
        return _mean(models, coeffs)
    _, fishers = statistics
    weighted = [float(c) * f.to(models[0].device, torch.float64) for c, f in zip(coeffs, fishers)]
    total = sum(weighted, torch.zeros_like(weighted[0]))
    floor = p.floor * float(total.mean()) if total.numel() else 0.0
    weighted = [w + floor * float(c) for w, c in zip(weighted, coeffs)]
    total = sum(weighted, torch.zeros_like(weighted[0]))
    merged = sum((w * m.double() for w, m in zip(weighted, models)), torch.zeros_like(total))
    return torch.where(total > 0, merged / total.clamp_min(1e-300), _mean(models).double()).to(models[0].dtype)


def collect(
    method: str,
    kind: str,
    models: list[Checkpoint],
    inputs: list[Checkpoint],
    sets: list[CalibrationSet],
    tokenizer: str | None,
    params: Params,
    seed: int,
    compute: Compute,
    folder: str | Path,
    progress: Reporter | None = None,
) -> tuple[StatisticsStore, str]:
    """Run each model on its calibration set and keep what `method` needs on disk in `folder`:
    Gram matrices of every linear layer's inputs (regmean; regmean++ layer by layer through the
    merged model), or diagonal Fisher (fisher), as `kind` ("grams", "grams-merged", "fisher") says.
    Also returns the tokenizer folder used."""
    tokenizer = find_tokenizer(inputs, tokenizer)
    device = torch.device(compute.device)
    runner = Runner.build(models[0], tokenizer, device)
    store = StatisticsStore(folder)
    batches = [-(-len(s.texts) // (1 if kind == "fisher" else BATCH)) for s in sets]
    with (progress or _no_progress)(f"calibration ({method})", "batches") as (on_start, step):
        if kind == "fisher":
            on_start(sum(batches))
            for i, (ckpt, calibration) in enumerate(zip(models, sets)):
                runner.load(_weights(runner.named(ckpt)))
                store.put(i, 0, {n: f.float() for n, f in runner.fisher(calibration.texts, seed, step).items()})
            return store, tokenizer
        groups = gram_groups(runner, by_layer=kind == "grams-merged")
        on_start(sum(batches) * len(groups))
        for name, (_, transposed) in runner.targets.items():
            store.transposed[name] = transposed
        if kind == "grams":
            for i, (ckpt, calibration) in enumerate(zip(models, sets)):
                runner.load(_weights(runner.named(ckpt)))
                for g, group in enumerate(groups):
                    store.put(i, g, runner.grams(calibration.texts, group, step))
            return store, tokenizer
        _regmean_plus_plus(runner, models, sets, groups, params, store, step)
    return store, tokenizer


def _weights(ckpt: Checkpoint) -> Callable[[str], torch.Tensor]:
    """A model's tensors by name, in float32; a NaN or Inf is refused naming the file and tensor."""
    return lambda name: require_finite_input(ckpt.get(name, dtype=torch.float32), ckpt.path, name)


def _regmean_plus_plus(
    runner: Runner,
    models: list[Checkpoint],
    sets: list[CalibrationSet],
    groups: list[list[str]],
    params: Params,
    store: StatisticsStore,
    step: Callable[[int], None],
) -> None:
    """RegMean++ (Nguyen et al. 2025, "RegMean++: Enhancing Effectiveness and Generalization of
    Regression Mean for Model Merging", §3, eq. 5): layer by layer, the inputs of layer ℓ's linear
    layers in model i come from the merged model's layers before ℓ (and its merged embeddings)
    feeding model i's own layer ℓ; layer ℓ is then merged by RegMean's formula before ℓ + 1 runs."""
    first = next((k for k, n in enumerate(runner.order) if layer_index(n) is not None), len(runner.order))
    position: dict[str, float] = {}
    for k, n in enumerate(runner.order):
        index = layer_index(n)
        position[n] = float(index) if index is not None else (-1.0 if k < first else float("inf"))
    merged = {n: torch.stack([_weights(runner.named(m))(n) for m in models]).mean(0) for n in runner.order}

    def hybrid(ckpt: Checkpoint, level: float) -> Callable[[str], torch.Tensor]:
        """The merged model before `level`, model `ckpt` from it on."""
        own = _weights(runner.named(ckpt))
        return lambda name: merged[name] if position[name] < level else own(name)

    for g, group in enumerate(groups):
        for i, (ckpt, calibration) in enumerate(zip(models, sets)):
            runner.load(hybrid(ckpt, position[group[0]]))
            store.put(i, g, runner.grams(calibration.texts, group, step))
        for name in group:
            grams = store.of(name, len(models))
            assert grams is not None
            merged[name] = regmean(
                None,
                [m.get(name, dtype=torch.float64) for m in models],
                torch.ones(len(models)),
                params,
                None,
                (store.transposed[name], grams),
            ).float()


class _NoProgress:
    def __enter__(self) -> Callbacks:
        return (lambda total, nbytes=0: None), (lambda done, nbytes=0: None)

    def __exit__(self, *exc: object) -> None:
        return None


def _no_progress(description: str, unit: str) -> _NoProgress:
    return _NoProgress()
