"""The parameters merge methods declare, and the values a method receives."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from weightlab.domains import Bool, Choice, Domain, Int, Real
from weightlab.errors import InvalidArgument
from weightlab.merging.settings import values_of, varies
from weightlab.merging.sparsify import RESCALES

MAX_COEFFICIENT = 1e6  # |λ|, |c_i| beyond this only overflow float32 maths


@dataclass(frozen=True)
class Param:
    """One parameter a method declares: what users write (`--param NAME=VALUE`, a YAML key), its
    values, default and meaning. A `per_model` parameter may take a value per model (a model's
    own `parameters:` in a recipe), read by the method with `Params.each`."""

    name: str
    domain: Domain
    default: Any
    help: str
    attribute: str = ""  # what the method reads (default: the name; `lambda` is a Python keyword)
    flag: str | None = None  # a command-line flag of its own, for the parameters most methods share
    per_model: bool = False
    required: bool = False  # no default: must be given

    @property
    def field(self) -> str:
        return self.attribute or self.name

    def per(self) -> Param:
        """This parameter, taken per model."""
        return replace(self, per_model=True)

    @property
    def shown_default(self) -> str:
        """The default as written in YAML: 0.5, true, l1, or 'required' / 'none' without one."""
        if self.default is None:
            return "required" if self.required else "none"
        if isinstance(self.default, bool):
            return "true" if self.default else "false"
        return self.default if isinstance(self.default, str) else f"{self.default:g}"


WEIGHT = Param("weight", Real(-MAX_COEFFICIENT, MAX_COEFFICIENT), 1.0, "a model's coefficient c_i", per_model=True)
NORMALIZE = Param("normalize", Bool(), True, "divide by the sum of the weights (of the agreeing entries, for TIES)")
RESCALE = Param(
    "rescale",
    Choice(*RESCALES),
    "inverse",
    "the kept entries of a random drop: inverse (÷ their keep probability), l1 (to τ's L1 norm), none",
)
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
DELLA_EPSILON = Param(
    "epsilon", Real(0, 1, low_open=True, high_open=True), 0.15, "half-width of DELLA's keep probabilities (density ± ε)"
).per()
SELECT_TOPK = Param("select_topk", Real(0, 1), 1.0, "SCE: fraction of the entries kept, by variance across models")
FILTER_WISE = Param("filter_wise", Bool(), False, "Model Stock: one ratio per row (filter), not per tensor")
NUSLERP_FLATTEN = Param("nuslerp_flatten", Bool(), True, "NuSLERP: interpolate the flattened tensors")
NUSLERP_ROW_WISE = Param(
    "nuslerp_row_wise", Bool(), False, "NuSLERP (not flattened): interpolate each column (mergekit's naming)"
)
NORMALIZE_WEIGHTS = Param("normalize_weights", Bool(), True, "Multi-SLERP: divide the weights by their sum")
EPS = Param("eps", Real(0, 1, low_open=True), 1e-8, "Multi-SLERP: added to norms (numerical floor)")
MAX_ITER = Param("max_iter", Int(1, 100_000), 10, "Karcher: iterations at most")
TOL = Param("tol", Real(0, 1, low_open=True), 1e-5, "Karcher: a step (or a norm) below this ends (or is zero)")
NEARSWAP_T = Param("t", Real(0, MAX_COEFFICIENT), None, "NearSwap: distance within which entries swap", required=True)
RAM_EPSILON = Param("epsilon", Real(0, MAX_COEFFICIENT), 1e-5, "RAM: |τ| above which a model moves an entry")
RAM_R = Param("r", Real(0, MAX_COEFFICIENT), 0.1, "RAM+: gain r of a model's own entries")
RAM_ALPHA = Param("alpha", Real(0, MAX_COEFFICIENT), 0.2, "RAM+: ceiling α of the shared/own ratio")
SCALE = Param(
    "scale", Real(-MAX_COEFFICIENT, MAX_COEFFICIENT, optional=True), None, "passthrough: multiply the tensor by this"
).per()
HETEROGENEITY = Param(
    "heterogeneity",
    Real(0, MAX_COEFFICIENT),
    0.3,
    "Var(log‖τ‖²)/mean(log‖τ‖²)² above which tasks count as heterogeneous",
)


class Params:
    """A method's parameter values, read as attributes (`p.lam`, `p.density`); a per-model one
    also model by model (`p.each("density")`), its attribute then the one value all share."""

    def __init__(self, values: dict[str, Any], per_model: dict[str, tuple[Any, ...]] | None = None):
        self._values = dict(values)
        self._per_model = dict(per_model or {})

    def __getattr__(self, name: str) -> float:
        return self.value(name)  # type: ignore[no-any-return]  # numbers; `value` for switches and words

    def value(self, name: str) -> Any:
        """A parameter's value of any kind (true/false, a word)."""
        state = self.__dict__  # empty while unpickling (a Ray worker)
        values: dict[str, Any] = state.get("_values", {})
        each = state.get("_per_model", {}).get(name)
        if each is not None:
            if len(set(each)) > 1:
                raise AttributeError(f"{name} differs between models: this step takes one {name}")
            return each[0]
        try:
            return values[name]
        except KeyError:
            raise AttributeError(f"this method declares no parameter {name!r}") from None

    def get(self, name: str, default: Any = None) -> Any:
        """A parameter's value, or `default` where the method does not declare it."""
        return self._values.get(name, default)

    def each(self, name: str, models: int) -> tuple[Any, ...]:
        """The parameter's value for each of `models` models."""
        return self._per_model.get(name) or (self.value(name),) * models

    def with_per_model(self, per_model: dict[str, tuple[Any, ...]]) -> Params:
        return Params(self._values, {**self._per_model, **per_model})

    def as_dict(self) -> dict[str, Any]:
        return dict(self._values)


def declared_param(declared: tuple[Param, ...], name: str, owner: str) -> Param:
    """The declaration of `name`; a name not declared is an error listing the ones that are."""
    found = next((p for p in declared if p.name == name), None)
    if found is None:
        known = ", ".join(p.name for p in declared) or "none"
        raise InvalidArgument(f"{owner} does not use {name} (its parameters: {known})")
    return found


def check_setting(param: Param, setting: Any, where: str | None = None) -> None:
    """Every value a setting (a value, gradient or filter list: `settings`) can give, in the
    parameter's domain."""
    for value in values_of(setting):
        param.domain.check(where or param.flag or f"--param {param.name}", value)


def resolve(declared: tuple[Param, ...], given: dict[str, Any], owner: str) -> Params:
    """Defaults overridden by `given` (names as users write them), each checked against its
    domain; a setting that varies over the tensors (a gradient, filters) is checked value by
    value and stands at its default here (`MergeConfig.tensor_params` resolves it per tensor)."""
    for name, value in given.items():
        check_setting(declared_param(declared, name, owner), value)
    missing = [p.name for p in declared if p.required and p.name not in given]
    if missing:
        raise InvalidArgument(f"{owner} needs {missing[0]} (it has no default): give --param {missing[0]}=VALUE")
    return Params(
        {p.field: given[p.name] if p.name in given and not varies(given[p.name]) else p.default for p in declared}
    )


Tensor = torch.Tensor
Generator = Callable[[int], torch.Generator]  # model index -> seeded generator for this tensor
