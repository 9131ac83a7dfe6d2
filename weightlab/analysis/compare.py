"""`weightlab compare`: which fine-tunes of one base agree, and which would fight when merged.

For fine-tunes i = 1..n of one base, τ_i = W_i − W for every tensor any of them changes (an
adapter's τ = s·B·A, from its factors). Per pair (i, j), over all tensors and per layer:

- cosine similarity of task vectors, cos_ij = Σ_t⟨τ_i^t, τ_j^t⟩ / (‖τ_i‖‖τ_j‖) (Ilharco et al.
  2023, "Editing Models with Task Arithmetic", §6 and Fig. 5: task vectors of different tasks
  are close to orthogonal; large positive cosines mean shared directions);
- subspace overlap, per matrix ‖U_iᵀU_j‖²_F/k (the mean cos² of the principal angles between
  the top-k left singular subspaces of ΔW_i and ΔW_j, Björck & Golub 1973), k cut to the
  numerical rank of both, averaged over matrices;
- sign conflict, the share of entries that TIES keeps in both τ_i and τ_j (top `density` by
  magnitude per tensor, ties to the lowest indices, exactly as `merge --method ties`) whose signs
  differ: #{both kept, sign differs} / #{both kept} (Yadav et al. 2023, "TIES-Merging", §3:
  sign interference);
- norm ratio ‖τ_i‖/‖τ_j‖: which model a plain sum of task vectors would follow.

Per-model pieces (norms, trims, singular subspaces) are computed once per tensor and the n×n
products from them: dot products and sign agreements as Gram matrices of the stacked task
vectors, a block of entries at a time (counts exact in int64). Models are ordered by average-
linkage clustering of 1 − cos (scipy), so that groups that agree sit together in the heatmaps.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from scipy.cluster.hierarchy import leaves_list, linkage
from scipy.spatial.distance import squareform

from weightlab.compute.deltas import adapter_factors, numerical_rank
from weightlab.compute.device import Compute
from weightlab.compute.gram import add_to_gram, to_singular, top_eigen, top_singular
from weightlab.compute.progress import Progress, read_bytes
from weightlab.compute.rows import ROW_BLOCK_BYTES, row_spans
from weightlab.compute.svd import lowrank_svd
from weightlab.compute.trim import TrimState, trim_block_, trim_state, trim_state_of_blocks
from weightlab.compute.walk import Batch, Selection, TensorWalk
from weightlab.display import described, model_names
from weightlab.errors import InvalidArgument
from weightlab.io.adapter import AdaptedCheckpoint
from weightlab.io.checkpoint import Checkpoint
from weightlab.io.finite import require_finite_input
from weightlab.matching import MatchedTensor
from weightlab.naming import is_conv1d
from weightlab.options import CompareOptions
from weightlab.results import Result, Table

BLOCK = 1 << 20  # entries per Gram block: float32 sign counts stay exact (< 2²⁴)
Square = list[list[float | None]]


@dataclass
class Pairwise:
    """n×n matrices (row i, column j); None where a model leaves everything here unchanged."""

    cosine: Square
    subspace_overlap: Square
    sign_conflict: Square


@dataclass
class LayerComparison(Pairwise):
    layer: int | None = None  # None: tensors outside the numbered layers (embeddings, head, final norm)


@dataclass
class CompareResult(Result):
    SCHEMA = "weightlab.compare/1"
    TITLE = "Compare: which fine-tunes agree, which would fight"
    REFERENCE = "Ilharco et al. 2023 (task-vector cosines); Yadav et al. 2023 (TIES sign conflicts)"
    ORDER = 25

    base: str
    finetuned: list[str]
    options: CompareOptions
    norms: list[float]  # ‖τ_i‖ over every compared tensor
    overall: Pairwise
    layers: list[LayerComparison]
    order: list[int]  # models in clustering order (heatmap rows and columns)
    tensors: int
    matrices: int
    problems: list[str] = field(default_factory=list)
    parameters: int | None = None  # entries of the compared tensors (None in results written before it was counted)

    def names(self) -> list[str]:
        """Each fine-tune's short name (`labels.model_names`)."""
        return model_names(self.finetuned)

    def pairs(self) -> list[dict]:
        n, o = len(self.finetuned), self.overall
        names = self.names()
        return [
            {
                "a": i,
                "b": j,
                "model_a": self.finetuned[i],
                "model_b": self.finetuned[j],
                "name_a": names[i],
                "name_b": names[j],
                "cosine": o.cosine[i][j],
                "subspace_overlap": o.subspace_overlap[i][j],
                "sign_conflict": o.sign_conflict[i][j],
                "norm_ratio": self.norms[i] / self.norms[j] if self.norms[j] > 0 else None,
            }
            for i in range(n)
            for j in range(i + 1, n)
        ]

    def to_dict(self) -> dict:
        return {**super().to_dict(), "pairs": self.pairs()}

    def rows(self) -> list[dict]:
        return self.pairs()

    def tables(self) -> list[Table]:
        ranked = sorted(self.pairs(), key=lambda p: -(p["cosine"] if p["cosine"] is not None else -2))
        over = f"over {self.tensors} tensors" + (
            f" ({self.parameters:,} parameters)" if self.parameters is not None else ""
        )
        pairs = Table(
            f"pairs, most compatible first (highest task-vector cosine), {over}",
            ["pair", "cos(τ_a, τ_b)", f"top-{self.options.k} overlap", "sign conflict", "‖τ_a‖/‖τ_b‖"],
            [
                [
                    f"{p['name_a']} × {p['name_b']}",
                    p["cosine"],
                    p["subspace_overlap"],
                    p["sign_conflict"],
                    p["norm_ratio"],
                ]
                for p in ranked
            ],
            f"sign conflict: share of entries TIES keeps in both (density {self.options.density}) whose signs "
            "differ; overlap: mean cos² of the principal angles",
        )
        names = self.names()
        models = Table(
            "models (clustering order)",
            ["model", "‖τ‖", "mean cos with the others", "path"],
            [[names[i], self.norms[i], self._mean_cosine(i), self.finetuned[i]] for i in self.order],
            numeric_from=1,
        )
        return [pairs, models]

    def _mean_cosine(self, i: int) -> float | None:
        values = [c for j, c in enumerate(self.overall.cosine[i]) if j != i and c is not None]
        return sum(values) / len(values) if values else None

    def headline(self) -> list[tuple[str, str, object]]:
        ranked = [p for p in self.pairs() if p["cosine"] is not None]
        ranked.sort(key=lambda p: -p["cosine"])
        conflicts = [p["sign_conflict"] for p in ranked if p["sign_conflict"] is not None]
        return [
            ("compare.models", "fine-tunes compared", len(self.finetuned)),
            (
                "compare.most_compatible",
                "most compatible pair",
                f"{ranked[0]['name_a']} × {ranked[0]['name_b']}" if ranked else None,
            ),
            (
                "compare.least_compatible",
                "least compatible pair",
                f"{ranked[-1]['name_a']} × {ranked[-1]['name_b']}" if ranked else None,
            ),
            (
                "compare.mean_cosine",
                "mean pairwise cosine",
                sum(p["cosine"] for p in ranked) / len(ranked) if ranked else None,
            ),
            (
                "compare.mean_sign_conflict",
                "mean sign conflict",
                sum(conflicts) / len(conflicts) if conflicts else None,
            ),
        ]

    def lines(self) -> list[str]:
        ranked = sorted((p for p in self.pairs() if p["cosine"] is not None), key=lambda p: -p["cosine"])
        if len(ranked) < 2:
            return []
        best, worst = ranked[0], ranked[-1]
        return [
            f"Most compatible: {best['name_a']} × {best['name_b']} (cos {best['cosine']:.3f}); least: "
            f"{worst['name_a']} × {worst['name_b']} (cos {worst['cosine']:.3f}, sign conflict "
            f"{fmt(worst['sign_conflict'])})."
        ]

    def note(self) -> str:
        return "Fine-tunes: " + ", ".join(described(self.finetuned))


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


class _Sums:
    """Per-layer running sums from which the n×n matrices follow."""

    def __init__(self, n: int):
        self.dots = np.zeros((n, n))
        self.agree_minus_differ = np.zeros((n, n), dtype=np.int64)  # Σ P_iP_j, P = kept sign (−1, 0, 1)
        self.both_kept = np.zeros((n, n), dtype=np.int64)  # Σ K_iK_j, K = |P|
        self.overlap = np.zeros((n, n))
        self.overlap_count = np.zeros((n, n), dtype=np.int64)

    def add(self, other: _Sums) -> None:
        for name, total in vars(self).items():
            total += getattr(other, name)  # numpy arrays: in place

    def pairwise(self) -> Pairwise:
        n = self.dots.shape[0]
        norm = np.sqrt(np.diag(self.dots))
        cosine = [
            [float(self.dots[i, j] / (norm[i] * norm[j])) if norm[i] > 0 and norm[j] > 0 else None for j in range(n)]
            for i in range(n)
        ]
        conflict = [
            [
                float((self.both_kept[i, j] - self.agree_minus_differ[i, j]) / 2 / self.both_kept[i, j])
                if self.both_kept[i, j] > 0
                else None
                for j in range(n)
            ]
            for i in range(n)
        ]
        overlap = [
            [
                float(self.overlap[i, j] / self.overlap_count[i, j]) if self.overlap_count[i, j] else None
                for j in range(n)
            ]
            for i in range(n)
        ]
        return Pairwise(cosine, overlap, conflict)


def task_vectors(
    finetuned: Sequence[Checkpoint],
    name: str,
    w: torch.Tensor,
    tensors: Sequence[torch.Tensor | None],
    compute: Compute,
) -> tuple[list[torch.Tensor], list[tuple | None]]:
    """τ_i for one tensor (matrix layout) — W_i − W, or an adapter's s·L·R (zero where the adapter
    leaves the tensor alone) — and each adapter's factors (L, R, s), read once, else None."""
    taus, factors = [], []
    for ft, w_ft in zip(finetuned, tensors):
        lowrank = None if w_ft is not None else adapter_factors(ft, name, compute)
        factors.append(lowrank)
        if w_ft is not None:
            taus.append(w_ft - w)
        else:
            taus.append(torch.zeros_like(w) if lowrank is None else lowrank[2] * lowrank[0] @ lowrank[1])
    return taus, factors


def sign_and_dot_sums(taus: list[torch.Tensor], trims: list[TrimState], sums: _Sums) -> None:
    """Add the dot products of the task vectors and the TIES sign agreements to `sums`; `trims`
    (`trim_state` of each τ) count their ties down, so consecutive row blocks may follow."""
    flats = [t.reshape(-1) for t in taus]
    for start in range(0, flats[0].numel(), BLOCK):
        block = torch.stack([f[start : start + BLOCK] for f in flats])
        sums.dots += (block.double() @ block.double().T).numpy()
        signs = torch.stack([torch.sign(trim_block_(row, trim)) for row, trim in zip(block, trims)])
        sums.agree_minus_differ += (signs @ signs.T).round().long().numpy()
        sums.both_kept += (signs.abs() @ signs.abs().T).round().long().numpy()


def subspace_sums(taus: list[torch.Tensor], factors: list[tuple | None], k: int, sums: _Sums) -> bool:
    """Add the pairwise top-k subspace overlaps of one matrix to `sums` (from an adapter's factors
    where there are some); False if it is no matrix."""
    if taus[0].ndim != 2 or min(taus[0].shape) < 2:
        return False
    bases = []
    for tau, lowrank in zip(taus, factors):
        svd = lowrank_svd(*lowrank) if lowrank is not None else top_singular(tau, k)[1]
        rank = min(k, numerical_rank(svd.S, tuple(tau.shape)))
        bases.append(svd.U[:, :rank].double())
    for i, a in enumerate(bases):
        for j, b in enumerate(bases):
            r = min(a.shape[-1], b.shape[-1])
            if r:
                sums.overlap[i, j] += float((a[:, :r].mT @ b[:, :r]).square().sum()) / r
                sums.overlap_count[i, j] += 1
    return True


def in_row_blocks(item: MatchedTensor, base: Checkpoint, finetuned: Sequence[Checkpoint]) -> bool:
    """Whether `compare` reads this tensor a block of rows at a time (`compare_in_rows`): a large
    tall matrix, stored as the maths sees it, in full checkpoints (an adapter's τ is read as factors)."""
    name = item.names[0]
    return (
        len(item.shape) == 2
        and item.shape[0] > item.shape[1]
        and item.is_float
        and not is_conv1d(name, base.config)
        and not any(isinstance(ft, AdaptedCheckpoint) for ft in finetuned)
        and base.info(name).nbytes > 2 * ROW_BLOCK_BYTES
    )


def _adding_to_gram(g: list[torch.Tensor | None], blocks: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    """`blocks` as they come, each added on the way to the Gram matrix g[0] (`add_to_gram`)."""
    for block in blocks:
        g[0] = add_to_gram(g[0], block)
        yield block


def compare_in_rows(
    item: MatchedTensor, base: Checkpoint, finetuned: Sequence[Checkpoint], options: CompareOptions, compute: Compute
) -> tuple[str, int | None, _Sums, bool]:
    """One large tall matrix's sums, as `work` computes them from whole tensors, with memory for
    one |τ| and blocks of rows. Two passes: per model, |τ| (its exact TIES threshold) and the Gram
    matrix τᵀτ summed over blocks, whose top-k eigenvectors V are τ's right singular vectors; then
    over blocks of every model at once, the dots and sign counts, and the overlaps from
    U_iᵀU_j = Σ_blocks (τ_iV_i/σ_i)ᵀ(τ_jV_j/σ_j)."""
    name, (rows, cols) = item.names[0], item.shape
    spans = row_spans(rows, base.info(name).nbytes, ROW_BLOCK_BYTES)
    n = len(finetuned)

    def tau(i: int, start: int, stop: int) -> torch.Tensor:
        def read(ckpt: Checkpoint, tensor: str) -> torch.Tensor:
            block = ckpt.get_rows(tensor, start, stop, compute.device, compute.dtype)
            return require_finite_input(block, ckpt.path, tensor)

        return read(finetuned[i], item.names[i + 1]) - read(base, name)

    trims: list[TrimState] = []
    vectors, singular = [], []
    for i in range(n):
        g: list[torch.Tensor | None] = [None]
        blocks = (tau(i, start, stop) for start, stop in spans)
        trims.append(trim_state_of_blocks(_adding_to_gram(g, blocks), rows * cols, options.density))
        assert g[0] is not None
        lam, v = top_eigen(g[0].cpu(), options.k)
        s = to_singular(lam)[: v.shape[-1]]
        rank = min(options.k, numerical_rank(s, (rows, cols)))
        vectors.append(v[:, :rank].to(compute.device))
        singular.append(s[:rank].to(compute.device))
    sums = _Sums(n)
    cross = [[torch.zeros(a.shape[-1], b.shape[-1], dtype=torch.float64) for b in vectors] for a in vectors]
    for start, stop in spans:
        taus = [tau(i, start, stop) for i in range(n)]
        sign_and_dot_sums(taus, trims, sums)
        left = [t.double() @ v / s for t, v, s in zip(taus, vectors, singular)]
        for i, a in enumerate(left):
            for j, b in enumerate(left):
                cross[i][j] += (a.mT @ b).cpu()
    for i, j in itertools.product(range(n), repeat=2):
        r = min(vectors[i].shape[-1], vectors[j].shape[-1])
        if r:
            sums.overlap[i, j] += float(cross[i][j][:r, :r].square().sum()) / r
            sums.overlap_count[i, j] += 1
    return name, item.layer, sums, True


def clustering_order(cosine: Square) -> list[int]:
    """Leaves of average-linkage clustering of 1 − cos (optimal leaf order), so that models that
    agree sit next to each other."""
    n = len(cosine)
    if n < 3:
        return list(range(n))
    distance = np.array(
        [
            [0.0 if i == j else 1.0 - (cosine[i][j] if cosine[i][j] is not None else 0.0) for j in range(n)]
            for i in range(n)
        ]
    )
    distance = np.clip((distance + distance.T) / 2, 0, 2)
    return [int(i) for i in leaves_list(linkage(squareform(distance, checks=False), "average", optimal_ordering=True))]


def compare(
    base: Checkpoint,
    finetuned: Sequence[Checkpoint],
    options: CompareOptions = CompareOptions(),
    compute: Compute | None = None,
    on_progress: Progress | None = None,
    on_start: Progress | None = None,
) -> CompareResult:
    """Pairwise compatibility of fine-tunes (checkpoints or adapters) of one base, overall and per layer."""
    if len(finetuned) < 2:
        raise InvalidArgument("compare: give at least two fine-tunes of the base")
    compute = replace(compute or Compute.create(), batch_size=1)  # n + 1 tensors in memory at a time
    n = len(finetuned)
    walk = TensorWalk([base, *finetuned], Selection.of(options, matrices=False), changed_by=finetuned)

    def work(batch: Batch, compute: Compute) -> list[tuple[str, int | None, _Sums, bool]]:
        out = []
        for b, item in enumerate(batch.items):
            name = item.names[0]
            taus, factors = task_vectors(
                finetuned, name, batch.tensors[0][b], [None if t is None else t[b] for t in batch.tensors[1:]], compute
            )
            sums = _Sums(n)
            sign_and_dot_sums(taus, [trim_state(t, options.density) for t in taus], sums)
            out.append((name, item.layer, sums, subspace_sums(taus, factors, options.k, sums)))
        return out

    by_layer: dict[int | None, _Sums] = {}
    in_rows = walk.take(lambda item: in_row_blocks(item, base, finetuned))
    sources = len(finetuned) + 1
    counted = (
        (lambda total, nbytes=0: on_start(total + len(in_rows), nbytes + read_bytes(in_rows, sources)))
        if on_start
        else None
    )
    pieces = walk.map(work, compute, factors=True, on_start=counted, on_progress=on_progress)
    for item in in_rows:
        pieces.append(compare_in_rows(item, base, finetuned, options, compute))
        if on_progress:
            on_progress(1, read_bytes([item], sources))
    pieces = walk.in_order(pieces, lambda piece: piece[0])
    for _, layer, sums, _ in pieces:  # summed in tensor order, however the work was split: the same bytes
        by_layer.setdefault(layer, _Sums(n)).add(sums)
    tensors, matrices = len(pieces), sum(is_matrix for *_, is_matrix in pieces)
    parameters = sum(math.prod(item.shape) for item in [*walk.items, *in_rows])
    total = _Sums(n)
    for sums in by_layer.values():
        total.add(sums)
    overall = total.pairwise()
    order = clustering_order(overall.cosine)
    layers = [
        LayerComparison(**asdict(by_layer[key].pairwise()), layer=key)
        for key in sorted(by_layer, key=lambda k: (k is None, k or 0))
    ]
    return CompareResult(
        str(base.path),
        [str(f.path) for f in finetuned],
        options,
        [math.sqrt(max(total.dots[i, i], 0.0)) for i in range(n)],
        overall,
        layers,
        order,
        tensors,
        matrices,
        walk.problems,
        parameters,
    )
