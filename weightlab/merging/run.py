"""Stream a merge tensor by tensor: read (ahead, in the background), merge on the device, write.

Peak memory is about (models + 2) tensors plus one output shard buffer, whatever the model size.

Rules for tensors that do not line up (docs/merge.md):
- not floating point (position ids, int buffers): copied from the base (else the first model);
- missing from a model, or of another shape (e.g. a resized vocabulary): an error naming the
  tensor and the file — resize or drop it before merging;
- only in a model, not in the base: left out, and listed in the report;
- dtypes may differ: the maths runs in float32 (float64 with `compute_dtype`), the output takes
  `--dtype` or else the base's dtype of that tensor.
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from weightlab.compute.device import Compute
from weightlab.compute.progress import Progress, Reporter, read_bytes
from weightlab.compute.rows import KEPT_TENSOR_BYTES, ROW_BLOCK_BYTES, RowReader, row_spans
from weightlab.compute.scratch import buffer, reusing_buffers
from weightlab.compute.stream import batches as stream_batches
from weightlab.compute.walk import Batch, Selection, TensorWalk
from weightlab.display import fmt, model_names
from weightlab.errors import InvalidArgument, MissingTensor, ShapeMismatch, UnsupportedDtype
from weightlab.io.adapter import AdaptedCheckpoint, LoraAdapter
from weightlab.io.atomic import scratch_folder
from weightlab.io.calibration import calibration_sets
from weightlab.io.checkpoint import Checkpoint
from weightlab.io.experts import ExpertPart, fused_parts
from weightlab.io.finite import require_finite_input
from weightlab.io.memory import StateDictWriter, config_files, config_text, donor_of
from weightlab.io.open import open_checkpoint
from weightlab.io.outputs import Output, check_outputs
from weightlab.io.safetensors_file import torch_dtype, write_safetensors
from weightlab.io.writer import DEFAULT_SHARD_SIZE, CheckpointWriter, stored_plan
from weightlab.matching import MatchedTensor, Matching
from weightlab.merging.coefficients import nan_coefficients
from weightlab.merging.config import RECORD, MergeConfig, from_record, record_yaml
from weightlab.merging.data_aware import collect
from weightlab.merging.expert_matching import matched
from weightlab.merging.layout import Origin, SliceView, slice_views
from weightlab.merging.mergekit import MERGEKIT_RECORD, recipe_of, recipe_yaml
from weightlab.merging.methods import MergeMethod
from weightlab.merging.modifiers import calibrate, lines_alpha, lines_scale
from weightlab.merging.params import Params
from weightlab.merging.settings import position
from weightlab.merging.vocabulary import AlignedVocabulary, VocabularyView, load_tokenizer, saved_tokenizer
from weightlab.naming import layer_index
from weightlab.results import Result, Table

MERGED = Selection(matrices=False, min_elements=0)  # every floating tensor, of any shape
ExpertOrders = dict[str, dict[str, dict[str, Any]]]  # model -> MoE block -> its ExpertOrder, as a dict


@dataclass
class MergeReport(Result):
    SCHEMA = "weightlab.merging/1"
    REFERENCE = "see docs/merge.md for each method's paper"
    ORDER = 60

    config: MergeConfig
    out: str
    merged: int  # tensors computed by the method
    copied: list[str]  # non-floating tensors copied from the base
    left_out: list[str]  # tensors only some models have
    coefficients: list[float]  # per model: the global coefficients, or the mean over tensors
    per_tensor: dict[str, list[float]] = field(default_factory=dict)  # NAN per tensor
    seconds: float = 0.0
    lines_alpha: float | None = None  # LiNeS's α, when it ran
    auto_lambda: dict[str, float] = field(default_factory=dict)  # --lambda auto: λ chosen per tensor
    calibration_texts: list[int] = field(default_factory=list)  # data-aware methods: texts each model ran on
    dequantized: dict[str, str] = field(default_factory=dict)  # quantized input -> its formats (read as floats)
    expert_orders: ExpertOrders = field(default_factory=dict)  # --match-experts: each model's order per MoE block

    def per_layer(self) -> dict[str, list[float]]:
        """Mean per-tensor coefficient of each model, per layer ("-" for tensors outside layers)."""
        groups: dict[str, list[list[float]]] = {}
        for name, cs in self.per_tensor.items():
            layer = layer_index(name)
            groups.setdefault("-" if layer is None else str(layer), []).append(cs)
        ordered = sorted(groups, key=lambda k: (k == "-", int(k) if k != "-" else 0))
        return {
            k: [sum(c[i] for c in groups[k]) / len(groups[k]) for i in range(len(self.coefficients))] for k in ordered
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": self.SCHEMA,
            "out": self.out,
            "config": self.config.to_dict(),
            "merged_tensors": self.merged,
            "copied_from_base": self.copied,
            "left_out": self.left_out,
            "coefficients": self.coefficients,
            "coefficients_per_layer": self.per_layer() if self.per_tensor else None,
            "coefficients_per_tensor": self.per_tensor or None,
            "seconds": round(self.seconds, 3),
            **({"lines_alpha": self.lines_alpha} if self.lines_alpha is not None else {}),
            **({"auto_lambda": self.auto_lambda} if self.auto_lambda else {}),
            **({"calibration_texts": self.calibration_texts} if self.calibration_texts else {}),
            **({"dequantized_inputs": self.dequantized} if self.dequantized else {}),
            **({"expert_orders": self.expert_orders} if self.expert_orders else {}),
        }

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> MergeReport:
        return cls(
            from_record(payload["config"]),
            payload.get("out", ""),
            payload["merged_tensors"],
            payload["copied_from_base"],
            payload["left_out"],
            payload["coefficients"],
            payload.get("coefficients_per_tensor") or {},
            payload.get("seconds", 0.0),
            payload.get("lines_alpha"),
            payload.get("auto_lambda") or {},
            payload.get("calibration_texts") or [],
            payload.get("dequantized_inputs") or {},
            payload.get("expert_orders") or {},
        )

    def title(self) -> str:
        detail = [self.config.method]
        if self.config.coeff == "nan":
            detail.append(f"NAN on {self.config.nan.norm_of}, per {self.config.nan.granularity}")
        detail += [f"{'λ' if k == 'lam' else k} {v:g}" for k, v in self.config.resolved.as_dict().items()]
        return f"Merge: {', '.join(detail)}"

    def tables(self) -> list[Table]:
        names = model_names(self.config.models)
        kind = "NAN" if self.config.coeff == "nan" else "manual"
        out = []
        if self.config.spec.coefficients:
            out.append(
                Table(
                    f"{kind} coefficients" + (" (mean over tensors)" if self.per_tensor else ""),
                    ["model", "coefficient"],
                    [[name, c] for name, c in zip(names, self.coefficients)],
                )
            )
        if self.calibration_texts:
            files = self.config.calibration or []
            files = files * len(names) if len(files) == 1 else files
            out.append(
                Table(
                    f"calibration (tokenizer {self.config.tokenizer})",
                    ["model", "calibration file", "texts"],
                    [[name, f, count] for name, f, count in zip(names, files, self.calibration_texts)],
                )
            )
        if self.expert_orders:
            out.append(
                Table(
                    "experts matched to the reference's (Hungarian on the cosine of whole experts)",
                    ["model", "MoE block", "order", "mean cos matched", "mean cos by index"],
                    [
                        [
                            model,
                            block,
                            "in order" if o["order"] == sorted(o["order"]) else str(o["order"]),
                            o["matched_cosine"],
                            o["index_cosine"],
                        ]
                        for model, by_block in self.expert_orders.items()
                        for block, o in by_block.items()
                    ],
                )
            )
        if self.per_tensor:
            out.append(
                Table(
                    "NAN coefficients per layer (mean over its tensors)",
                    ["layer", *names],
                    [[layer, *cs] for layer, cs in self.per_layer().items()],
                )
            )
        return out

    def lines(self) -> list[str]:
        out = []
        if self.auto_lambda:
            values = list(self.auto_lambda.values())
            out.append(
                f"λ auto: mean {fmt(sum(values) / len(values))} over {len(values)} tensors "
                f"(from {fmt(min(values))} to {fmt(max(values))})"
            )
        if self.left_out:
            out.append(
                f"note: {len(self.left_out)} tensors only in some models were left out: {', '.join(self.left_out[:5])}"
            )
        for model, by_block in self.expert_orders.items():
            moved = [b for b, o in by_block.items() if o["order"] != sorted(o["order"])]
            out.append(
                f"--match-experts: {model}: experts reordered in {len(moved)} of {len(by_block)} MoE blocks"
                + (f" ({', '.join(moved[:4])}{', …' if len(moved) > 4 else ''})" if moved else "")
            )
        for model, formats in self.dequantized.items():
            out.append(
                f"note: {model} is quantized ({formats}): merged from its dequantized values, nothing re-quantized"
            )
        done = f"merged {self.merged} tensors, copied {len(self.copied)} from the base"
        done += f", in {self.seconds:.1f}s → {self.out}/"
        return [*out, done]

    def headline(self) -> list[tuple[str, str, object]]:
        return [
            ("merge.method", "method", self.config.method),
            ("merge.models", "models merged", len(self.config.models)),
            *(
                [("merge.coefficients", "coefficients", ", ".join(fmt(c) for c in self.coefficients))]
                if self.config.spec.coefficients
                else []
            ),
        ]

    def note(self) -> str:
        if self.per_tensor:
            return "Coefficients per layer: " + "; ".join(
                f"{k}: " + ", ".join(f"{c:.3f}" for c in v) for k, v in self.per_layer().items()
            )
        return f"parameters: {json.dumps(self.config.resolved.as_dict())}"


def auto_lambda(update_norm: float, summed_norm: float, coeffs: Sequence[float]) -> float:
    """`--lambda auto`: the λ at which the merged update is as long as the tasks' weighted mean
    update (the uniform soup's step from the base), ‖λΔ‖ = ‖Σ_i c_iτ_i‖/Σ_i|c_i|, so
    λ = ‖Σ_i c_iτ_i‖/(Σ_i|c_i|·‖Δ‖), Δ the method's update at λ = 1 (`update_norm` = ‖Δ‖,
    `summed_norm` = ‖Σ_i c_iτ_i‖). The method chooses the direction; the soup, which stays in the
    fine-tunes' basin (Wortsman et al. 2022), the length. Task arithmetic gets λ = 1/Σ_i|c_i| (1/N
    with unit weights: the mean); a method that already averages (a disjoint mean, Iso-C's flat
    spectrum) gets the factor that brings it back to the mean's length. A negative weight (a task
    subtracted) counts by its size, so λ stays positive and the update keeps the method's sign.
    1 when Δ or the mean is zero."""
    total = sum(abs(c) for c in coeffs)
    mean_length = summed_norm / total if total else 0.0
    return mean_length / update_norm if update_norm > 0 and mean_length > 0 else 1.0


def weighted_sum_norm(taus: Sequence[torch.Tensor], coeffs: Sequence[float]) -> float:
    """‖Σ_i c_iτ_i‖_F, summed in float64."""
    summed = sum((c * t.double() for c, t in zip(coeffs, taus)), torch.zeros_like(taus[0], dtype=torch.float64))
    return float(summed.norm())


def tensor_seed(seed: int, name: str, model: int) -> int:
    """A seed for one tensor of one model: independent of the order tensors are visited in."""
    return (seed * 1_000_003 + zlib.crc32(name.encode()) * 31 + model) % (2**63 - 1)


def _check_alignment(matching: Matching, ckpts: list[Checkpoint], has_base: bool) -> tuple[list[str], list[str]]:
    """Non-floating tensors only the base has (copied as they are), and tensors only some models
    have (left out); a shape mismatch or a floating tensor a model lacks is an error."""
    if matching.shape_mismatches:
        key, shapes = matching.shape_mismatches[0]
        where = ", ".join(f"{c.path} {list(s)}" for c, s in zip(ckpts, shapes))
        raise ShapeMismatch(
            f"shapes differ between inputs ({where}); resize or exclude it before merging", ckpts[0].path, key
        )
    for ckpt in ckpts:
        complex_tensor = next((n for n in ckpt.names() if ckpt.info(n).dtype.startswith("C")), None)
        if complex_tensor is not None:  # not a float, so it would be copied from the base unmerged
            raise UnsupportedDtype("is complex: weightlab merges real-valued weights", ckpt.path, complex_tensor)
    anchor = ckpts[0]
    only_anchor = matching.unmatched[str(anchor.path)]
    buffers = [n for n in only_anchor if not anchor.info(n).is_float]
    for name in only_anchor:
        if name not in buffers:
            lacking = next(c for c in ckpts[1:] if name not in c)
            raise MissingTensor(
                f"{'the base' if has_base else 'the first model'} has it but this model does not", lacking.path, name
            )
    left_out = sorted({n for c in ckpts[1:] for n in matching.unmatched[str(c.path)]})
    return buffers, left_out


def _model_norms(
    models: list[Checkpoint], base: Checkpoint | None, task_vectors: bool, compute: Compute
) -> list[float]:
    """‖θ_i‖ (or ‖τ_i‖) over every merged tensor: one streaming pass for model-level NAN."""
    walk = TensorWalk([base, *models] if base is not None else models, MERGED)
    squares = [0.0] * len(models)
    for batch in walk.batches(replace(compute, dtype=torch.float64, batch_size=1), stored_layout=True):
        mats = [m[0] for m in batch.dense()]
        w0 = mats[0] if base is not None else None
        for i, m in enumerate(mats[1:] if base is not None else mats):
            x = m - w0 if task_vectors and w0 is not None else m  # norms of task vectors need the base
            squares[i] += float((x * x).sum())
    return [s**0.5 for s in squares]


def _nbytes(ckpt: Checkpoint, name: str) -> int:
    return ckpt.info(name).nbytes


def _merge_in_rows(
    item: MatchedTensor,
    ckpts: list[Checkpoint],
    has_base: bool,
    spec: MergeMethod,
    coeffs: list[float],
    params: Params,
    compute: Compute,
    writer: CheckpointWriter | StateDictWriter,
    out_dtype: torch.dtype,
) -> None:
    """Merge one large tensor a block of rows at a time (`MergeMethod.blockwise`), the next block
    read while this one is merged (a block is valid until the next one is asked for: its buffer
    takes the block after): memory holds (2·models + 2) blocks, not (models + 2) tensors,
    and what the method's `statistics` keep of the whole (TIES: counts; Iso-C: two Gram-sized
    matrices), read a block at a time too. Where the statistics read the tensor first and all
    inputs' bytes fit KEPT_TENSOR_BYTES, the blocks stay as read for the passes after."""
    name, rows = item.names[0], item.shape[0]
    spans = row_spans(rows, _nbytes(ckpts[0], name), ROW_BLOCK_BYTES)
    on_cpu = torch.device(compute.device).type == "cpu"  # elsewhere, rows are copied to the device anyway
    # a method that reads the tensor more than once (its statistics first) keeps every block as
    # read when all inputs' bytes fit KEPT_TENSOR_BYTES: the later passes read memory, not files
    sizes = [_nbytes(c, n) for c, n in zip(ckpts, item.names)]
    keep = spec.statistics is not None and on_cpu and sum(sizes) <= KEPT_TENSOR_BYTES
    kept: dict[tuple[int, int], torch.Tensor] = {}
    # else each input's blocks land in two kept buffers, this block's and the one read ahead (as
    # stored, then in the maths' dtype): a fresh 32 MB block costs more in page faults than
    # the arithmetic on it
    block_rows = max(stop - start for start, stop in spans)
    parity = {start: k % 2 for k, (start, _) in enumerate(spans)}

    def stored_buffers(i: int, size: int) -> list[torch.Tensor] | None:
        if not on_cpu:
            return None
        if keep:
            return [buffer(f"kept-{i}", (size,), torch.uint8, "cpu")]
        return [buffer(f"read-{i}-{p}", (block_rows * size // rows,), torch.uint8, "cpu") for p in (0, 1)]

    stored = [stored_buffers(i, size) for i, size in enumerate(sizes)]
    cast = [
        [buffer(f"read-cast-{i}-{p}", (block_rows, *item.shape[1:]), compute.dtype, compute.device) for p in (0, 1)]
        if not (spec.stored_models and has_base and i > 0) and torch_dtype(c.info(n).dtype, c.path, n) != compute.dtype
        else None  # used as stored: the method takes it so, or it is stored in the maths' dtype
        for i, (c, n) in enumerate(zip(ckpts, item.names))
    ]

    def read(i: int, start: int, stop: int) -> torch.Tensor:
        c, n, p, buffers = ckpts[i], item.names[i], parity[start], stored[i]
        rows_read = kept.get((i, start))
        if rows_read is None:
            if buffers is None:
                into = None
            elif keep:
                into = buffers[0][start * (sizes[i] // rows) :]  # its place in the whole tensor's buffer
            else:
                into = buffers[p]
            rows_read = require_finite_input(c.get_rows(n, start, stop, compute.device, into=into), c.path, n)
            if keep:
                kept[(i, start)] = rows_read
        return _cast(rows_read, cast[i], p, stop - start)

    weights = torch.tensor(coeffs, dtype=compute.dtype, device=compute.device)
    reader = RowReader(read, item.shape, spans, len(ckpts))
    state = None if spec.statistics is None else spec.statistics(reader, weights, params)
    for (start, _), blocks in zip(spans, reader.all_blocks()):
        w0, thetas = (blocks[0], blocks[1:]) if has_base else (None, blocks)
        assert spec.blockwise is not None
        merged = spec.blockwise(w0, thetas, weights, params, state)
        writer.add_rows(name, start, buffer("rows-out", merged.shape, out_dtype, merged.device).copy_(merged))


def _cast(rows: torch.Tensor, slots: list[torch.Tensor] | None, parity: int, count: int) -> torch.Tensor:
    """Rows in the maths' dtype: copied into this block's slot where they need a cast."""
    return rows if slots is None else slots[parity][:count].copy_(rows)


def in_row_blocks(config: MergeConfig, item: MatchedTensor, ckpts: Sequence[Checkpoint]) -> bool:
    """Whether the executor merges this tensor a block of rows at a time (`_merge_in_rows`): a
    large floating tensor, a method with a blockwise form, nothing that needs the whole tensor,
    and no adapter's update of it (W + s·B·A is formed whole)."""
    anchor = ckpts[0]
    return (
        config.spec.blockwise is not None
        and item.is_float
        and not config.modifiers
        and not config.auto_lambda
        and not (config.coeff == "nan" and config.nan.granularity == "tensor")
        and len(item.shape) > 0
        and item.shape[0] > 1
        and config.spec.splits(item.shape)
        and _nbytes(anchor, item.names[0]) >= 2 * ROW_BLOCK_BYTES
        and not any(c.formed_whole(n) for c, n in zip(ckpts, item.names))
        and not fused_parts(item.names[0], tuple(item.shape), anchor.config)  # merged expert by expert
    )


def open_base(config: MergeConfig, opened: Mapping[str, Checkpoint | LoraAdapter]) -> Checkpoint | None:
    """The merge's base, by path or already open in memory: full weights, never an adapter."""
    if not config.base:
        return None
    found = opened[config.base] if config.base in opened else open_checkpoint(config.base)
    if isinstance(found, LoraAdapter):
        raise InvalidArgument(
            "this is a LoRA adapter, not full weights: the base must be the model it adapts", config.base
        )
    return found


def _as_model(found: Checkpoint | LoraAdapter, base: Checkpoint | None, source: str) -> Checkpoint:
    """A model to merge: full weights as they are, an adapter as the fine-tune it makes of the base."""
    if not isinstance(found, LoraAdapter):
        return found
    if base is None:
        raise InvalidArgument(
            "a LoRA adapter: give --base, the model it adapts (its weights W + s·B·A are merged), "
            "or merge adapters into an adapter with --as-adapter",
            source,
        )
    return AdaptedCheckpoint(base, found)


def open_inputs(
    config: MergeConfig, opened: Mapping[str, Checkpoint | LoraAdapter]
) -> tuple[Checkpoint | None, list[Checkpoint], TensorWalk, list[str], list[str], ExpertOrders]:
    """The base, the models, the walk over every tensor, the buffers copied from the base, the
    tensors left out and the expert orders matched (`--match-experts`): the inputs of a merge,
    checked to line up. With slices, the base and the models are views of the slices' sources
    under the output's names (`layout`)."""
    base = open_base(config, opened)
    named: dict[str, Checkpoint] = {config.base: base} if config.base is not None and base is not None else {}
    for m in config.referenced():
        if m not in named:
            named[m] = _as_model(opened[m] if m in opened else open_checkpoint(m), base, m)
    if config.vocabulary is not None:  # every model's vocabulary rows on the output's vocabulary
        # the vocabulary's base: the merge's, or a base_model merged as one more input (its donor)
        aligned = AlignedVocabulary(
            config.vocabulary, named, config.base or (config.donor if config.donor in named else None)
        )
        named = {m: VocabularyView(ckpt, m, aligned) for m, ckpt in named.items()}
        base = named[config.base] if config.base is not None else None
    if config.slices:
        view, views, _ = slice_views(config.slices, config.base, config.uses_base, named)
        base, models = view, list[Checkpoint](views)
    else:
        models = [named[m] for m in config.models]
    orders: ExpertOrders = {}
    if config.match_experts:
        models, found = matched(base if base is not None else models[0], models, config.models)
        orders = {model: {block: asdict(o) for block, o in by_block.items()} for model, by_block in found.items()}
    ckpts = [base, *models] if base is not None else models
    walk = TensorWalk(ckpts, replace(MERGED, floating=False))
    buffers, left_out = _check_alignment(walk.matching, ckpts, base is not None)
    return base, models, walk, buffers, left_out, orders


def tensor_params(
    config: MergeConfig, item: MatchedTensor, ckpts: list[Checkpoint], has_base: bool, layers: int
) -> tuple[Params, list[float]] | None:
    """The parameters and weights of one tensor where they vary by tensor (`MergeConfig.tensor_params`:
    gradients, filters, a model's own settings, slices), else None (the merge's own hold)."""
    if not config.varies_by_tensor:
        return None
    name, models = (
        item.names[0],
        list(zip(ckpts[1:] if has_base else ckpts, item.names[1:] if has_base else item.names)),
    )
    anchor = ckpts[0]
    if isinstance(anchor, SliceView):
        origin = anchor.origin(name)
        inputs = [c.origin(n).name for c, n in models if isinstance(c, SliceView)]
    else:
        origin = Origin(None, position(layer_index(name), layers), name)
        inputs = [n for _, n in models]
    return config.tensor_params(name, origin, inputs)


def side_files(config: MergeConfig, anchor: Checkpoint) -> dict[str, str]:
    """What the output holds beside its weights because the merge changed it: config.json with the
    layer count of slices and the vocabulary size of an aligned vocabulary, and that vocabulary's
    tokenizer (or the donor's, for a chat template); the donor's files stand for the rest."""
    files: dict[str, str] = {}
    source = next(iter(anchor.sources.values()))[0] if isinstance(anchor, SliceView) else anchor
    raw = dict(anchor.config.raw) if anchor.config is not None and anchor.config.raw else None
    if isinstance(source, VocabularyView):
        files.update(source.vocabulary.tokenizer_files(config.chat_template))
        if raw is not None:
            raw["vocab_size"] = source.vocabulary.rows
    elif config.chat_template is not None:
        folder = (
            (Path(config.donor) if Path(config.donor).is_dir() else Path(config.donor).parent)
            if config.donor
            else source.folder
        )
        tokenizer = load_tokenizer(folder, config.donor or str(source.path))
        files.update(saved_tokenizer(tokenizer, config.chat_template, []))
    if raw is not None and (isinstance(anchor, SliceView) or isinstance(source, VocabularyView)):
        files["config.json"] = config_text(raw)
    return files


PartMerge = Callable[[str, torch.Tensor | None, list[torch.Tensor]], torch.Tensor]  # (key, base, models) -> merged


def per_part(
    experts: dict[str, ExpertPart],
) -> Callable[[PartMerge, torch.Tensor | None, list[torch.Tensor]], torch.Tensor]:
    """`fn(key, base, models)` applied to each expert's matrix of a fused expert tensor (named by
    its per-expert name), the results put back in the fused layout: every method sees matrices."""

    def apply(fn: PartMerge, base: torch.Tensor | None, models: list[torch.Tensor]) -> torch.Tensor:
        out = torch.empty_like(models[0])
        for key, part in experts.items():
            own = [part.take(t[part.expert]) for t in models]
            part.put(out, fn(key, None if base is None else part.take(base[part.expert]), own))
        return out

    return apply


def dequantized_inputs(ckpts: Sequence[Checkpoint]) -> dict[str, str]:
    """Each quantized input (GGUF, GPTQ, …) with its storage formats: merged from the values they
    decode to, and written in full precision (the record says so)."""
    out = {}
    for ckpt in ckpts:
        formats = sorted({info.stored.format for n in ckpt.names() if (info := ckpt.info(n)).stored is not None})
        if formats:
            out[str(ckpt.path)] = ", ".join(formats)
    return out


def num_layers(ckpt: Checkpoint) -> int:
    """L: the config's layer count, else one more than the largest layer index in the names."""
    if ckpt.config is not None and ckpt.config.num_layers:
        return ckpt.config.num_layers
    return max((i for i in map(layer_index, ckpt.names()) if i is not None), default=-1) + 1


class _LinesSpill:
    """LiNeS needs norms over the whole model before any tensor is scaled: the merged task vectors
    wait on disk (one file each, beside the output) while the norms accumulate."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.names: list[str] = []
        self.summed_l1 = self.merged_l1 = 0.0

    def add(self, name: str, base: torch.Tensor, models: list[torch.Tensor], merged: torch.Tensor) -> None:
        delta = merged - base
        summed: torch.Tensor = sum((m - base for m in models), torch.zeros_like(base))
        self.summed_l1 += float(summed.abs().sum())
        self.merged_l1 += float(delta.abs().sum())
        write_safetensors(self.folder / f"{len(self.names)}.safetensors", {"delta": delta.cpu().contiguous()})
        self.names.append(name)

    def alpha(self, models: int) -> float:
        return lines_alpha(self.summed_l1, self.merged_l1, models)

    def scaled(
        self, base: Checkpoint, compute: Compute, alpha: float, beta: float, layers: int
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """θ_b + (α + β·ℓ/(L−1))·τ_m for every spilled tensor (Wang et al. 2025, eq. 1)."""
        for i, name in enumerate(self.names):
            delta = load_file(self.folder / f"{i}.safetensors")["delta"].to(compute.device)
            w0 = base.get(name, compute.device, compute.dtype)
            yield name, w0 + lines_scale(layer_index(name), layers, alpha, beta) * delta


def merge(
    config: MergeConfig,
    out_dir: str | Path | StateDictWriter,
    *,
    opened: Mapping[str, Checkpoint] | None = None,
    force: bool = False,
    shard_size: int | str | None = None,
    donor: str | Path | None = None,
    compute: Compute | None = None,
    on_progress: Progress | None = None,
    on_start: Progress | None = None,
    progress: Reporter | None = None,
    recorded: MergeConfig | None = None,
    records: Mapping[str, str] | None = None,
) -> MergeReport:
    """Merge `config.models` (onto `config.base`) into a new checkpoint folder `out_dir`, with
    `weightlab_merge.yml` in it to make it again, or into memory (a `StateDictWriter`: its
    `state`). `opened` holds models already open (in memory) by the names the config gives them.
    `shard_size` and `donor` default to the config's. `progress` reports the calibration runs of
    data-aware methods. A stage of a longer recipe (`stages`) names in its records the config
    `recorded` (its models by stage name) and writes `records` (name -> text) instead of its own
    `weightlab_merge.yml` and `mergekit_config.yml`."""
    started = time.perf_counter()
    shard_size = shard_size if shard_size is not None else config.shard_size or DEFAULT_SHARD_SIZE
    donor = donor if donor is not None else config.donor
    opened = opened or {}
    in_memory = isinstance(out_dir, StateDictWriter)
    if not isinstance(out_dir, StateDictWriter):
        on_disk = [s for s in (config.base, *config.models, donor) if s not in opened]
        check_outputs(on_disk, [Output("-o", out_dir, directory=True)], force)
    compute = compute or Compute.create()
    spec, params = config.spec, config.resolved

    base, models, walk, buffers, left_out, orders = open_inputs(config, opened)
    ckpts = [base, *models] if base is not None else models
    items = walk.items
    nan = config.coeff == "nan"
    task_vectors = config.nan.norm_of == "task-vectors"
    n = len(models)
    if nan and config.nan.granularity == "model":
        fixed = nan_coefficients(
            _model_norms(models, base, task_vectors, compute), config.nan.power, config.nan.normalize
        )
    else:
        fixed = list(config.weights) if config.weights is not None else [1.0] * n
    per_tensor: dict[str, list[float]] = {}
    out_dtype = getattr(torch, config.dtype) if config.dtype else None
    report = MergeReport(recorded or config, "in memory" if in_memory else str(out_dir), 0, [], left_out, fixed)
    report.dequantized = dequantized_inputs(ckpts)
    report.expert_orders = orders
    meta = {"weightlab_merge_method": config.method}
    anchor = ckpts[0]

    layers = num_layers(anchor)
    plan = [
        (n, shape, out_dtype if out_dtype is not None and dtype.is_floating_point else dtype)
        for n, shape, dtype in stored_plan(anchor, [i.names[0] for i in items] + buffers)
    ]
    files = {} if donor else config_files(ckpts[0])
    if isinstance(anchor, SliceView):  # its config and tokenizer: the first source's
        donor = donor or next(iter(anchor.sources.values()))[0].folder
    files.update(side_files(config, anchor))
    out_dtype_of = {n: dtype for n, _, dtype in plan}
    if compute.cluster is not None and spec.calibration:
        raise InvalidArgument(f"{config.method} runs the models on this machine: run it without --ray")
    if compute.cluster is not None and "lines" in config.modifiers:
        raise InvalidArgument(
            "--lines scales each layer after a pass over all of them, on this machine: run it without --ray"
        )
    in_rows = walk.take(lambda item: in_row_blocks(config, item, ckpts))
    with ExitStack() as stack:
        writer: CheckpointWriter | StateDictWriter
        if isinstance(out_dir, StateDictWriter):
            writer = stack.enter_context(out_dir.planned(plan))
        else:
            writer = stack.enter_context(
                CheckpointWriter(
                    out_dir,
                    shard_size=shard_size,
                    metadata=meta,
                    force=force,
                    plan=plan,
                    donor=donor or donor_of(ckpts[0]),
                    files=files,
                )
            )
        one_at_a_time = replace(compute, batch_size=1)  # memory: (models + 2) tensors
        lines = (
            _LinesSpill(
                stack.enter_context(
                    scratch_folder(None if in_memory else Path(str(out_dir)).parent, ".weightlab-lines-")
                )
            )
            if "lines" in config.modifiers
            else None
        )
        statistics = None
        if spec.calibration:
            assert config.calibration is not None
            sets = calibration_sets(config.calibration, n, config.calibration_sha256)
            folder = stack.enter_context(
                scratch_folder(None if in_memory else Path(str(out_dir)).parent, ".weightlab-calibration-")
            )
            donors = [c for c in (base, *models) if c is not None]
            statistics, config.tokenizer = collect(
                config.method,
                spec.calibration,
                models,
                donors,
                sets,
                config.tokenizer,
                params,
                config.seed,
                compute,
                folder,
                progress,
            )
            config.calibration_sha256 = [s.sha256 for s in sets[: len(config.calibration)]]
            if recorded is not None:
                recorded.tokenizer, recorded.calibration_sha256 = config.tokenizer, config.calibration_sha256
            report.calibration_texts = [len(s.texts) for s in sets]
        counted = (
            (lambda total, nbytes=0: on_start(total + len(in_rows), nbytes + read_bytes(in_rows, len(ckpts))))
            if on_start
            else None
        )
        # on a Ray cluster the workers write their tensors into the staged shards themselves
        sink = writer.sink([i.names[0] for i in walk.items], elsewhere=compute.cluster is not None)

        def work(batch: Batch, compute: Compute) -> list[tuple[str, bool, list[float] | None, float | None]]:
            """Merge (or copy) one tensor into its place: (name, merged, its NAN coefficients or None)."""
            item = batch.items[0]
            name = item.names[0]
            tensors = [m[0] for m in batch.dense()]
            if not item.is_float:
                sink(name, tensors[0].cpu())
                return [(name, False, None, None)]
            w0 = tensors[0] if base is not None else None
            thetas = tensors[1:] if base is not None else tensors
            varying = tensor_params(config, item, ckpts, base is not None, layers)
            tensor_p, coeffs = varying if varying is not None else (params, fixed)
            own = coeffs if varying is not None and spec.coefficients else None
            if nan and config.nan.granularity == "tensor":
                norms = [float((t - w0).norm()) if task_vectors and w0 is not None else float(t.norm()) for t in thetas]
                coeffs = own = nan_coefficients(norms, config.nan.power, config.nan.normalize)
            extra = {}
            if statistics is not None:
                found = statistics.of(name, n)
                extra["statistics"] = None if found is None else (statistics.transposed.get(name, False), found)
            weights = torch.tensor(coeffs, dtype=compute.dtype, device=compute.device)

            def merged_as(key: str, w: torch.Tensor | None, ts: list[torch.Tensor]) -> torch.Tensor:
                seeded = lambda i: torch.Generator().manual_seed(tensor_seed(config.seed, key, i))
                return spec.fn(w, ts, weights, tensor_p, seeded, **extra)

            def calibrated(merged: torch.Tensor, w: torch.Tensor, ts: list[torch.Tensor]) -> torch.Tensor:
                return w + calibrate(merged - w, [t - w for t in ts], params.svc_alpha)

            experts = fused_parts(name, tuple(item.shape), anchor.config)
            by_expert = per_part(experts) if experts else None
            merged = by_expert(merged_as, w0, thetas) if by_expert else merged_as(name, w0, thetas)
            lam = None
            if config.auto_lambda:
                assert w0 is not None  # auto λ needs a base (MergeConfig)
                lam = auto_lambda(
                    float((merged - w0).double().norm()), weighted_sum_norm([t - w0 for t in thetas], coeffs), coeffs
                )
                merged = w0 + lam * (merged - w0)
            if "svc" in config.modifiers:
                assert w0 is not None  # modifiers need a base (MergeConfig)
                merged = (
                    by_expert(
                        lambda _, w, ts: calibrated(ts[0], w if w is not None else ts[0], ts[1:]), w0, [merged, *thetas]
                    )
                    if by_expert
                    else calibrated(merged, w0, thetas)
                )
            if lines is not None:
                assert w0 is not None
                lines.add(name, w0, thetas, merged)
            else:
                sink(name, merged.to(out_dtype_of[name]))
            return [(name, True, own, lam)]

        done = walk.map(work, one_at_a_time, stored_layout=True, on_start=counted, on_progress=on_progress)
        if compute.cluster is not None:
            writer.written_elsewhere([name for name, *_ in done])
        position = {i.names[0]: k for k, i in enumerate(i for b in stream_batches(walk.items, 1) for i in b)}
        for name, merged, own, lam in sorted(done, key=lambda piece: position[piece[0]]):  # a local run's order
            if not merged:
                report.copied.append(name)
            elif own is not None:
                per_tensor[name] = own
            if lam is not None:
                report.auto_lambda[name] = lam
        report.merged += sum(merged for _, merged, *_ in done)
        with reusing_buffers():  # the blocks' buffers, mapped once for every large tensor
            for item in in_rows:
                varying = tensor_params(config, item, ckpts, base is not None, layers)
                tensor_p, coeffs = varying if varying is not None else (params, fixed)
                if varying is not None and spec.coefficients:
                    per_tensor[item.names[0]] = coeffs
                _merge_in_rows(
                    item, ckpts, base is not None, spec, coeffs, tensor_p, compute, writer, out_dtype_of[item.names[0]]
                )
                report.merged += 1
                if on_progress:
                    on_progress(1, read_bytes([item], len(ckpts)))
        if lines is not None:
            report.lines_alpha = lines.alpha(n)
            assert base is not None
            for name, scaled in lines.scaled(base, compute, report.lines_alpha, params.lines_beta, layers):
                writer.add(name, scaled.to(out_dtype_of[name]))
        for name in buffers:  # e.g. position_ids a fine-tune was saved without
            writer.add(name, ckpts[0].get(name))
            report.copied.append(name)
        if per_tensor:
            report.coefficients = [sum(c[i] for c in per_tensor.values()) / len(per_tensor) for i in range(n)]
        report.per_tensor = per_tensor
        report.seconds = time.perf_counter() - started
        record = {k: v for k, v in report.to_dict().items() if k not in ("out", "seconds")}  # same inputs, same bytes
        writer.add_file("weightlab_merge.json", json.dumps(record, indent=2) + "\n")
        stored = next((dtype for _, _, dtype in plan if dtype.is_floating_point), torch.float32)
        recipe = recipe_of(recorded or config, str(stored).removeprefix("torch."))
        default = {RECORD: record_yaml(recorded or config)}
        if recipe is not None:  # the same merge in mergekit's words, for mergekit to run
            default[MERGEKIT_RECORD] = recipe_yaml(recipe)
        for name, text in (records if records is not None else default).items():
            writer.add_file(name, text)
    return report
