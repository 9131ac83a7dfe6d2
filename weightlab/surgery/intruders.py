"""Intruder-dimension mitigation: scale the intruder directions of a fine-tune by λ.

Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence" (§3, §6 and
Fig. 8): fine-tuning, LoRA above all, creates *intruder dimensions* — top singular vectors u'_i
of W' = W + ΔW with max_j |cos(u'_i, u_j)| < ε against every singular vector u_j of the base —
and they carry much of the forgetting. Scaling them down recovers pre-training behaviour at a
small cost in the task:

    W'_new = W' + (λ − 1) Σ_{i ∈ I} σ'_i u'_i v'_iᵀ,   I = intruders among the top k of W',

the formula of PEFT's `reduce_intruder_dimension` (defaults k = 10, ε = 0.5, λ = 0.75). A dense
fine-tune gives a checkpoint in which only the matrices with intruders differ. An adapter gives
an adapter, exactly: B' = [s·B, (λ−1)·U_I Σ_I], A' = [A; V_Iᵀ] at scale 1, so its rank grows by
|I| (PEFT instead re-truncates to r, which also moves the other directions). Everything else the
adapter holds comes along: modules outside the filters, LoRA biases (as s·b), and saved modules
(a saved matrix with intruders gets the same correction, densely).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import torch

from weightlab.compute.device import Compute
from weightlab.compute.spectra import intruder_dimensions
from weightlab.compute.walk import Batch, Selection, TensorWalk
from weightlab.errors import InvalidArgument
from weightlab.io.adapter import AdaptedCheckpoint
from weightlab.io.adapter_writer import LoraFactors, NewAdapter
from weightlab.io.checkpoint import Checkpoint
from weightlab.io.safetensors_file import torch_dtype
from weightlab.io.writer import CheckpointWriter
from weightlab.naming import from_matrix
from weightlab.options import IntruderOptions
from weightlab.results import Result, Table


@dataclass
class MitigatedMatrix:
    name: str
    layer: int | None
    role: str
    shape: list[int]
    intruders: list[int]  # positions among W''s top k
    best_match_cos: list[float]  # of each of the top k
    sigma: list[float]  # σ'_i of the intruders
    delta_norm: float  # ‖ΔW‖_F before
    removed_norm: float  # ‖(1 − λ) Σ σ'_i u'_i v'_iᵀ‖_F = (1 − λ)(Σ σ'_i²)^½


@dataclass
class IntruderReport(Result):
    SCHEMA = "weightlab.intruders/1"
    TITLE = "Intruder dimensions scaled down"
    REFERENCE = "Shuttleworth et al. 2024, LoRA vs Full Fine-tuning: An Illusion of Equivalence"
    ORDER = 60

    base: str
    finetuned: str
    out: str
    kind: str  # "checkpoint" or "adapter"
    options: IntruderOptions
    matrices: list[MitigatedMatrix] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"schema": self.SCHEMA, **asdict(self), "summary": self.summary()}

    def summary(self) -> dict:
        hit = [m for m in self.matrices if m.intruders]
        return {
            "matrices": len(self.matrices),
            "with_intruders": len(hit),
            "intruders": sum(len(m.intruders) for m in hit),
        }

    def rows(self) -> list[dict]:
        return [
            {
                "name": m.name,
                "layer": m.layer,
                "role": m.role,
                "intruders": len(m.intruders),
                "positions": " ".join(map(str, m.intruders)),
                "delta_norm": m.delta_norm,
                "removed_norm": m.removed_norm,
            }
            for m in self.matrices
        ]

    def tables(self) -> list[Table]:
        hit = sorted((m for m in self.matrices if m.intruders), key=lambda m: -len(m.intruders))
        return [
            Table(
                f"Intruders scaled by λ = {self.options.scale:g}: {len(hit)} of {len(self.matrices)} matrices",
                ["tensor", "layer", "role", "intruders", "positions", "best |cos|", "σ'", "removed / ‖ΔW‖"],
                [
                    [
                        m.name,
                        m.layer,
                        m.role,
                        len(m.intruders),
                        " ".join(map(str, m.intruders)),
                        min(m.best_match_cos[i] for i in m.intruders),
                        max(m.sigma),
                        m.removed_norm / m.delta_norm if m.delta_norm else None,
                    ]
                    for m in hit
                ],
                f"an intruder: one of the top {self.options.top_k} singular vectors of W' with best |cos| "
                f"< {self.options.epsilon:g} against every base singular vector",
                names=True,
                numeric_from=3,
            )
        ]

    def lines(self) -> list[str]:
        s = self.summary()
        return [
            f"{s['intruders']} intruder dimensions in {s['with_intruders']} of {s['matrices']} matrices scaled by "
            f"λ = {self.options.scale:g}; every other weight is the fine-tune's own → {self.out} ({self.kind})"
        ]

    def headline(self) -> list[tuple[str, str, object]]:
        s = self.summary()
        return [
            ("intruders.count", "intruder dimensions scaled", s["intruders"]),
            ("intruders.matrices", "matrices changed", s["with_intruders"]),
        ]


def mitigate_intruders(
    base: Checkpoint,
    finetuned: Checkpoint,
    out: str,
    options: IntruderOptions = IntruderOptions(),
    writer: CheckpointWriter | None = None,
    compute: Compute | None = None,
    on_progress: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> tuple[IntruderReport, NewAdapter | None]:
    """Scale every intruder direction of `finetuned` (a checkpoint, or an adapter applied to
    `base`) by λ. A dense fine-tune is written whole into `writer` (planned with its stored
    layout; on a Ray cluster the workers write their matrices into it); an adapter comes back
    whole as a `NewAdapter` at scale 1."""
    compute = compute or Compute.create()
    adapter = isinstance(finetuned, AdaptedCheckpoint)
    walk = TensorWalk([base, finetuned], Selection.of(options), changed_by=[finetuned])
    if not walk.items:
        raise InvalidArgument(
            "the fine-tune shares no weight matrix with the base; is it of another model?", finetuned.path
        )
    report = IntruderReport(str(base.path), str(finetuned.path), out, "adapter" if adapter else "checkpoint", options)
    chosen = {item.names[0] for item in walk.items}
    sink = None
    if writer is not None and not adapter:
        for name in finetuned.names():
            if name not in chosen:
                writer.add(name, finetuned.get(name))
        sink = writer.sink([item.names[0] for item in walk.items], compute.cluster is not None)

    def stored(name: str, new: torch.Tensor) -> torch.Tensor:
        """A matrix back in the fine-tune's storage layout and dtype."""
        info = finetuned.adapter.saved[finetuned.saved_of[name]] if adapter else finetuned.info(name)
        return (
            from_matrix(name, new, info.shape, finetuned.config).to(torch_dtype(info.dtype, finetuned.path, name)).cpu()
        )

    def work(batch: Batch, compute: Compute) -> list[tuple[MitigatedMatrix, LoraFactors | torch.Tensor | None]]:
        out = []
        for b, item in enumerate(batch.items):
            name = item.names[0]
            w, w_ft = batch.tensors[0][b], batch.tensors[1][b]
            delta_norm = float((w_ft.double() - w.double()).norm())
            found, best, top = (
                intruder_dimensions(w, w_ft, options.top_k, options.epsilon) if delta_norm > 0 else ([], [], None)
            )
            sigma = [float(top.S[i]) for i in found]
            entry = MitigatedMatrix(
                name,
                item.layer,
                item.role,
                list(w.shape),
                found,
                best,
                sigma,
                delta_norm,
                (1 - options.scale) * math.sqrt(sum(x * x for x in sigma)),
            )
            correction = None
            if found:
                index = torch.tensor(found, device=top.U.device)
                left = top.U[:, index] * (top.S[index] * (options.scale - 1))
                correction = (left, top.Vh[index])  # (λ − 1) U_I Σ_I, V_Iᵀ
            product: LoraFactors | torch.Tensor | None = None
            if adapter and name in finetuned.module_of:
                product = finetuned.adapter.at_scale_one(finetuned.module_of[name], torch.float64)
                if correction is not None:
                    product = replace(
                        product, b=torch.cat([product.b, correction[0]], 1), a=torch.cat([product.a, correction[1]])
                    )
                product = replace(
                    product,
                    a=product.a.float(),
                    b=product.b.float(),
                    bias=None if product.bias is None else product.bias.float(),
                )
            elif adapter:  # a saved module's matrix: corrected densely
                product = stored(name, w_ft if correction is None else w_ft.double() + correction[0] @ correction[1])
            elif sink is not None:
                dtype = torch_dtype(finetuned.info(name).dtype, finetuned.path, name)
                if correction is None and dtype.itemsize > w_ft.element_size():
                    sink(name, finetuned.get(name))  # read at a lower precision: the stored bytes again
                else:  # untouched, back to the stored dtype exactly (it is no wider than the compute dtype)
                    sink(
                        name,
                        stored(name, w_ft if correction is None else w_ft.double() + correction[0] @ correction[1]),
                    )
            out.append((entry, product))
        return out

    pieces = walk.in_order(walk.map(work, compute, on_start=on_start, on_progress=on_progress), lambda p: p[0].name)
    report.matrices = [entry for entry, _ in pieces]
    if writer is not None and not adapter and compute.cluster is not None:
        writer.written_elsewhere([entry.name for entry, _ in pieces])
    if not adapter:
        return report, None
    done = {entry.name: product for entry, product in pieces}
    whole = finetuned.adapter
    factors = {
        module: done[name] if name in done else whole.at_scale_one(module)
        for name, module in finetuned.module_of.items()
    }
    saved = {
        own: done[name] if name in done and name not in finetuned.module_of else whole.read_saved(own)
        for name, own in finetuned.saved_of.items()
    }
    return report, NewAdapter(
        factors,
        1.0,
        whole.base_model_name_or_path,
        bool(whole.adapter_config.get("fan_in_fan_out")),
        saved,
    )
