"""`weightlab angles`: principal angles between the top-k singular subspaces of two checkpoints.

For orthonormal bases Q_A, Q_B of two subspaces, the cosines of the principal angles are the
singular values of Q_AᵀQ_B (Björck & Golub 1973, "Numerical methods for computing angles
between linear subspaces", Thm. 1). Small angles are taken from the sines instead, the singular
values of Q_B − Q_A(Q_AᵀQ_B), which keeps them accurate where arccos is ill-conditioned
(Knyazev & Argentati 2002, SIAM J. Sci. Comput. 23(6), Alg. 3.1; scipy's `subspace_angles`).

With a base checkpoint the subspaces are those of the task vectors ΔW_A = W_A − W_base and
ΔW_B = W_B − W_base: small angles mean two fine-tunes compete for the same directions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from weightlab.analysis.summary import group_summary, mean
from weightlab.compute.deltas import delta_top_svd, numerical_rank
from weightlab.compute.device import Compute
from weightlab.compute.svd import SVD, top_svd
from weightlab.compute.walk import Batch, Selection, TensorWalk
from weightlab.errors import InvalidArgument
from weightlab.io.adapter import AdaptedCheckpoint
from weightlab.io.checkpoint import Checkpoint
from weightlab.options import AnglesOptions
from weightlab.results import Result, Table


def principal_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians, ascending) between span(a) and span(b), both with orthonormal
    columns. Returns min(k_a, k_b) angles."""
    if a.shape[-1] < b.shape[-1]:
        a, b = b, a  # residual of the smaller basis against the larger one
    overlap = a.mT @ b
    cosines = torch.linalg.svdvals(overlap).clamp(0, 1)  # descending -> angles ascending
    sines = torch.linalg.svdvals(b - a @ overlap).clamp(0, 1).flip(-1)  # ascending -> angles ascending
    small = cosines**2 >= 0.5
    return torch.where(small, torch.arcsin(sines), torch.arccos(cosines))


@dataclass
class MatrixAngles:
    name: str
    layer: int | None
    role: str
    shape: list[int]
    side: str  # "left" (column space, U) or "right" (row space, V)
    k: int  # subspace dimension used (capped by the rank of a task vector)
    angles_deg: list[float]  # ascending
    cosines: list[float]

    @property
    def mean_angle(self) -> float:
        return sum(self.angles_deg) / len(self.angles_deg) if self.angles_deg else float("nan")

    @property
    def overlap(self) -> float:
        """Mean cos²: 1 when the subspaces coincide, about k/d for random ones."""
        return sum(c * c for c in self.cosines) / len(self.cosines) if self.cosines else float("nan")

    @property
    def spans_whole_space(self) -> bool:
        """k reaches the dimension of the side's space (rows for left, columns for right): both
        subspaces are the whole space and every angle is 0 by construction, no finding."""
        return self.k >= self.shape[0 if self.side == "left" else 1]

    def row(self) -> dict:
        return {
            "name": self.name,
            "layer": self.layer,
            "role": self.role,
            "rows": self.shape[0],
            "cols": self.shape[1],
            "side": self.side,
            "k": self.k,
            "mean_angle_deg": self.mean_angle,
            "min_angle_deg": self.angles_deg[0] if self.angles_deg else None,
            "max_angle_deg": self.angles_deg[-1] if self.angles_deg else None,
            "overlap": self.overlap,
            "spans_whole_space": self.spans_whole_space,
        }


@dataclass
class AnglesResult(Result):
    SCHEMA = "weightlab.angles/1"
    REFERENCE = "Björck & Golub 1973; Knyazev & Argentati 2002"
    ORDER = 20

    a: str
    b: str
    base: str | None
    options: AnglesOptions
    matrices: list[MatrixAngles]
    num_layers: int | None = None
    problems: list[str] = field(default_factory=list)

    def title(self) -> str:
        return f"Principal angles between the {'task vectors' if self.base else 'weights'} of A and B"

    def to_dict(self) -> dict:
        return {
            "schema": self.SCHEMA,
            "a": self.a,
            "b": self.b,
            "base": self.base,
            "options": asdict(self.options),
            "num_layers": self.num_layers,
            "problems": self.problems,
            "summary_by_layer": summarise_angles(self.matrices, "layer"),
            "summary_by_role": summarise_angles(self.matrices, "role"),
            "matrices": [
                {
                    **asdict(m),
                    "mean_angle_deg": m.mean_angle,
                    "overlap": m.overlap,
                    "spans_whole_space": m.spans_whole_space,
                }
                for m in self.matrices
            ],
        }

    def rows(self) -> list[dict]:
        return [m.row() for m in self.matrices]

    def tables(self) -> list[Table]:
        main = Table(
            f"principal angles of {'task vectors' if self.base else 'weights'}, top-{self.options.k} subspaces "
            "(most aligned first)",
            ["matrix", "layer", "role", "side", "k", "mean °", "min °", "max °", "mean cos²", "note"],
            [
                [
                    m.name,
                    m.layer,
                    m.role,
                    m.side,
                    m.k,
                    m.mean_angle,
                    m.angles_deg[0] if m.angles_deg else None,
                    m.angles_deg[-1] if m.angles_deg else None,
                    m.overlap,
                    "k spans the whole space: 0° by construction" if m.spans_whole_space else None,
                ]
                for m in sorted(self.matrices, key=lambda m: (m.spans_whole_space, m.mean_angle))
            ],
            names=True,
        )
        by = [
            Table(
                f"by {key}",
                ["side", key, "matrices", "mean °", "mean cos²"],
                [
                    [s["side"], s[key], s["matrices"], s["mean_angle_deg"], s["overlap"]]
                    for s in summarise_angles(self.matrices, key)
                ],
                numeric_from=2,
            )
            for key in ("layer", "role")
        ]
        return [main, *by]

    def headline(self) -> list[tuple[str, str, object]]:
        ms = self.findings()
        closest = min(ms, key=lambda m: m.mean_angle) if ms else None
        return [
            (
                "angles.mean_angle_deg",
                "mean principal angle (°)",
                sum(m.mean_angle for m in ms) / len(ms) if ms else None,
            ),
            ("angles.most_aligned", "most aligned matrix", closest.name if closest else None),
            ("angles.matrices", "matrices compared", len(self.matrices)),
        ]

    def findings(self) -> list[MatrixAngles]:
        """The matrices whose angles say something: not those whose k spans the whole space."""
        return [m for m in self.matrices if not m.spans_whole_space]

    def note(self) -> str:
        return f"A = {self.a}, B = {self.b}" + (f", base = {self.base}" if self.base else "")


def summarise_angles(matrices: Sequence[MatrixAngles], by: str) -> list[dict]:
    return group_summary(
        [m for m in matrices if m.angles_deg and not m.spans_whole_space],
        {"side": lambda m: m.side, by: lambda m: getattr(m, by)},
        {"matrices": len, "mean_angle_deg": mean(lambda m: m.mean_angle), "overlap": mean(lambda m: m.overlap)},
    )


def _bases(svd: SVD, side: str) -> dict[str, torch.Tensor]:
    sides = ("left", "right") if side == "both" else (side,)
    return {s: svd.U if s == "left" else svd.Vh.mT for s in sides}


def angles(
    a: Checkpoint,
    b: Checkpoint,
    base: Checkpoint | None = None,
    options: AnglesOptions = AnglesOptions(),
    compute: Compute | None = None,
    on_progress: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> AnglesResult:
    """Principal angles between top-k singular subspaces of matching matrices of `a` and `b`
    (of their task vectors when `base` is given)."""
    compute = compute or Compute.create()
    for ckpt in (a, b):
        if isinstance(ckpt, AdaptedCheckpoint) and base is None:
            raise InvalidArgument("an adapter input needs --base (its update is relative to a base)", ckpt.path)
    # with a base, an adapter's task vector is zero outside its modules: keep what both change
    walk = TensorWalk(
        [a, b] if base is None else [base, a, b],
        Selection.of(options),
        changed_by=[a, b] if base is not None else [],
        every=True,
    )

    def work(batch: Batch, compute: Compute) -> list[MatrixAngles | str]:
        """The angles of each matrix, or its name when it is unchanged in A or B."""
        out: list[MatrixAngles | str] = []
        for i, item in enumerate(batch.items):
            name = item.names[0]
            if base is None:
                svd_a, svd_b = (top_svd(m[i], options.k, options.svd, options.seed) for m in batch.tensors)
            else:
                w, wa, wb = (None if m is None else m[i] for m in batch.tensors)
                svd_a = delta_top_svd(a, name, w, wa, options.k, compute, options.svd, options.seed)
                svd_b = delta_top_svd(b, name, w, wb, options.k, compute, options.svd, options.seed)
                shape = tuple(w.shape)
                k = min(numerical_rank(svd_a.S, shape), numerical_rank(svd_b.S, shape))
                svd_a, svd_b = svd_a.truncate(k), svd_b.truncate(k)
            k = min(svd_a.S.shape[-1], svd_b.S.shape[-1])
            if k == 0:
                out.append(name)
                continue
            for side, qa in _bases(svd_a, options.side).items():
                qb = _bases(svd_b, side)[side]
                theta = principal_angles(qa[:, :k], qb[:, :k])
                degrees = [math.degrees(t) for t in theta.tolist()]
                out.append(
                    MatrixAngles(
                        name,
                        item.layer,
                        item.role,
                        list(batch.tensors[0].shape[-2:]),
                        side,
                        k,
                        degrees,
                        [math.cos(t) for t in theta.tolist()],
                    )
                )
        return out

    pieces = walk.map(work, compute, factors=base is not None, on_start=on_start, on_progress=on_progress)
    results = [p for p in pieces if isinstance(p, MatrixAngles)]
    unchanged = [p for p in pieces if isinstance(p, str)]
    num_layers = walk.sources[0].config.num_layers if walk.sources[0].config else None
    problems = walk.problems
    if unchanged:
        unchanged = walk.in_order(unchanged, str)
        problems.append(
            f"{len(unchanged)} matrices left out: unchanged from the base in A or B ({', '.join(unchanged[:3])}"
            + (", …)" if len(unchanged) > 3 else ")")
        )
    return AnglesResult(
        str(a.path),
        str(b.path),
        None if base is None else str(base.path),
        options,
        walk.in_order(results, lambda m: m.name),
        num_layers,
        problems,
    )
