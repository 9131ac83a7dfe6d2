"""The parameters merge methods declare, and the values a method receives."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from weightlab.domains import Domain, Int, Real
from weightlab.errors import InvalidArgument

MAX_COEFFICIENT = 1e6  # |λ|, |c_i| beyond this only overflow float32 maths


@dataclass(frozen=True)
class Param:
    """One parameter a method declares: what users write (`--param NAME=VALUE`, a YAML key), its
    values, default and meaning."""

    name: str
    domain: Domain
    default: float
    help: str
    attribute: str = ""  # what the method reads (default: the name; `lambda` is a Python keyword)
    flag: str | None = None  # a command-line flag of its own, for the parameters most methods share

    @property
    def field(self) -> str:
        return self.attribute or self.name


LAMBDA = Param(
    "lambda", Real(-MAX_COEFFICIENT, MAX_COEFFICIENT), 1.0, "scale λ of the merged task vector", "lam", "--lambda"
)
DENSITY = Param("density", Real(0, 1, low_open=True), 1.0, "fraction of entries kept", flag="--density")
GAMMA = Param("gamma", Real(0, 1, high_open=True), 0.01, "fraction of largest-magnitude entries dropped")
SLERP_EPSILON = Param("epsilon", Real(0, 1, high_open=True), 5e-4, "1 − |cos Ω| below which SLERP is linear")
SLERP_T = Param("t", Real(0, 1), 0.5, "position between the two models (0: the first)")
COMMON = Param("common", Real(0, 1), 0.8, "fraction of the rank kept as the common subspace")
RANK = Param("rank", Real(0, 1, low_open=True), 0.08, "rank kept per deviation, as a fraction of min(m, n)")
RATIO = Param("ratio", Real(0, 1, low_open=True), 0.1, "fraction of entries each task keeps")
STEPS = Param("steps", Int(1, 100_000), 300, "Adam iterations")
LR = Param("lr", Real(0, 1, low_open=True), 1e-5, "Adam learning rate")
RIDGE = Param("ridge", Real(0, MAX_COEFFICIENT), 1e-2, "ε added to each estimated covariance's diagonal")
REFINE = Param("refine", Real(0, 1), 0.3, "fraction of the spectrum the refinement flattens (heterogeneous tasks)")
ALPHA = Param("alpha", Real(0, 1), 0.9, "RegMean's shrinkage: the Gram matrices' off-diagonal entries are scaled by α")
FLOOR = Param(
    "floor",
    Real(0, 1),
    1e-6,
    "Fisher floor, a fraction of the tensor's mean Fisher (entries no text moves are averaged)",
)
HETEROGENEITY = Param(
    "heterogeneity",
    Real(0, MAX_COEFFICIENT),
    0.3,
    "Var(log‖τ‖²)/mean(log‖τ‖²)² above which tasks count as heterogeneous",
)


class Params:
    """A method's parameter values, read as attributes (`p.lam`, `p.density`)."""

    def __init__(self, values: dict[str, float]):
        self._values = dict(values)

    def __getattr__(self, name: str) -> float:
        values: dict[str, float] = self.__dict__.get("_values", {})  # absent while unpickling (a Ray worker)
        try:
            return values[name]
        except KeyError:
            raise AttributeError(f"this method declares no parameter {name!r}") from None

    def as_dict(self) -> dict[str, float]:
        return dict(self._values)


def resolve(declared: tuple[Param, ...], given: dict[str, Any], owner: str) -> Params:
    """Defaults overridden by `given` (names as users write them), each checked against its
    domain; a name not declared is an error listing the ones that are."""
    by_name = {p.name: p for p in declared}
    for name, value in given.items():
        spec = by_name.get(name)
        if spec is None:
            known = ", ".join(by_name) or "none"
            raise InvalidArgument(f"{owner} does not use {name} (its parameters: {known})")
        spec.domain.check(spec.flag or f"--param {name}", value)
    return Params({p.field: given.get(p.name, p.default) for p in declared})


Tensor = torch.Tensor
Generator = Callable[[int], torch.Generator]  # model index -> seeded generator for this tensor
