"""What to merge and how: typed, validated once, from options or a YAML file (ours or mergekit's).

Unknown keys and parameters a method does not use are errors, never silently ignored.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from weightlab.errors import InvalidArgument
from weightlab.merge.coefficients import NanOptions
from weightlab.merge.methods import METHODS, MergeParams

OUTPUT_DTYPES = ("float32", "float16", "bfloat16", "float64")
PARAM_KEYS = {"lambda": "lam", "density": "density", "gamma": "gamma", "epsilon": "epsilon", "t": "t"}
OUR_KEYS = {"method", "base", "models", "weights", "coeff", "nan", "seed", "dtype", *PARAM_KEYS}
# mergekit method names -> ours, and top-level keys we accept as no-ops (they only tune mergekit's memory use)
MERGEKIT_METHODS = {"linear": "average", "task_arithmetic": "task-arithmetic", "ties": "ties", "dare_linear": "dare-linear",
                    "dare_ties": "dare-ties", "breadcrumbs": "breadcrumbs", "breadcrumbs_ties": "breadcrumbs-ties",
                    "slerp": "slerp", "model_stock": "model-stock"}
MERGEKIT_NOOP_PARAMETERS = {"int8_mask", "normalize"}
MERGEKIT_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "tokenizer_source", "out_dtype"}


@dataclass
class MergeConfig:
    method: str
    models: list[str]
    base: str | None = None
    weights: list[float] | None = None
    coeff: str = "manual"  # manual | nan
    nan: NanOptions = field(default_factory=NanOptions)
    params: MergeParams = field(default_factory=MergeParams)
    explicit_params: frozenset[str] = frozenset()  # MergeParams fields the user set
    seed: int = 0
    dtype: str | None = None  # output dtype; default: each tensor's dtype in the base

    def __post_init__(self) -> None:
        if self.method == "nan":
            self.coeff = "nan"
        self.validate()

    def validate(self) -> None:
        if self.method not in METHODS:
            raise InvalidArgument(f"--method {self.method!r}: choose one of {', '.join(METHODS)}")
        spec = METHODS[self.method]
        n = len(self.models)
        if n < spec.min_models or (spec.max_models and n > spec.max_models):
            wanted = spec.min_models if spec.min_models == spec.max_models else f"at least {spec.min_models}"
            raise InvalidArgument(f"{self.method} merges {wanted} models, got {n}")
        if spec.needs_base and not self.base:
            raise InvalidArgument(f"{self.method} needs --base (task vectors are relative to it)")
        unused = self.explicit_params - spec.params
        if unused:
            names = ", ".join("--" + ("lambda" if u == "lam" else u) for u in sorted(unused))
            raise InvalidArgument(f"{self.method} does not use {names}")
        uses_coefficients = self.method not in ("slerp", "model-stock")
        if self.weights is not None:
            if not uses_coefficients:
                raise InvalidArgument(f"{self.method} takes no --weights")
            if len(self.weights) != n:
                raise InvalidArgument(f"--weights has {len(self.weights)} values for {n} models")
            if self.coeff == "nan":
                raise InvalidArgument("--weights and --coeff nan both set the coefficients; use one")
        if self.coeff not in ("manual", "nan"):
            raise InvalidArgument(f"--coeff {self.coeff!r}: choose manual or nan")
        if self.coeff == "nan":
            if not uses_coefficients:
                raise InvalidArgument(f"{self.method} takes no coefficients, so --coeff nan does not apply")
            if self.nan.norm_of == "task-vectors" and not self.base:
                raise InvalidArgument("NAN on task vectors needs --base")
        if self.dtype is not None and self.dtype not in OUTPUT_DTYPES:
            raise InvalidArgument(f"--dtype {self.dtype!r}: choose one of {', '.join(OUTPUT_DTYPES)}")
        if not 0 < self.params.density <= 1:
            raise InvalidArgument(f"--density must be in (0, 1], got {self.params.density}")
        if not 0 <= self.params.gamma < 1:
            raise InvalidArgument(f"--gamma must be in [0, 1), got {self.params.gamma}")

    def to_dict(self) -> dict:
        return {"method": self.method, "base": self.base, "models": self.models, "weights": self.weights,
                "coeff": self.coeff, "nan": asdict(self.nan) if self.coeff == "nan" else None,
                "params": {k: v for k, v in asdict(self.params).items() if k in METHODS[self.method].params},
                "seed": self.seed, "dtype": self.dtype}


def params_from(values: dict[str, float | None]) -> tuple[MergeParams, frozenset[str]]:
    """MergeParams from option values (None = not given), and which were given."""
    given = {PARAM_KEYS.get(k, k): v for k, v in values.items() if v is not None}
    known = {f.name for f in fields(MergeParams)}
    return MergeParams(**{k: float(v) for k, v in given.items() if k in known}), frozenset(given)


def build_config(options: dict) -> MergeConfig:
    """A validated `MergeConfig` from keyword options, with method parameters given as
    `param_values` by their option names (lambda, density, gamma, epsilon, t)."""
    options = dict(options)
    options["params"], options["explicit_params"] = params_from(options.pop("param_values", {}))
    return MergeConfig(**options)


def load_config(path: str | Path) -> dict:
    """Read a YAML merge config as options for `build_config` (mergekit's format too)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        raise InvalidArgument(f"not valid YAML ({str(e).splitlines()[0]})", path) from None
    if not isinstance(data, dict):
        raise InvalidArgument("a merge config is a mapping of keys to values", path)
    return _from_mergekit(data, path) if "merge_method" in data else _from_ours(data, path)


def _from_ours(data: dict, path) -> dict:
    unknown = set(data) - OUR_KEYS
    if unknown:
        raise InvalidArgument(f"unknown keys {', '.join(sorted(unknown))} (known: {', '.join(sorted(OUR_KEYS))})", path)
    out = {k: data[k] for k in ("method", "base", "weights", "coeff", "seed", "dtype") if k in data}
    models = data.get("models") or []
    if models and isinstance(models[0], dict):  # [{model: path, weight: w}, ...]
        out["weights"] = [float(m.get("weight", 1.0)) for m in models] if any("weight" in m for m in models) else None
        models = [m["model"] for m in models]
    out["models"] = [str(m) for m in models]
    if "nan" in data:
        nan = data["nan"] or {}
        bad = set(nan) - {f.name for f in fields(NanOptions)}
        if bad:
            raise InvalidArgument(f"unknown nan options {', '.join(sorted(bad))}", path)
        out["nan"] = NanOptions(**nan)
    out["param_values"] = {k: data[k] for k in PARAM_KEYS if k in data}
    return out


def _from_mergekit(data: dict, path) -> dict:
    unknown = set(data) - MERGEKIT_KEYS
    if unknown:
        raise InvalidArgument(f"mergekit keys not supported here: {', '.join(sorted(unknown))}", path)
    method = MERGEKIT_METHODS.get(data["merge_method"])
    if method is None:
        raise InvalidArgument(f"mergekit merge_method {data['merge_method']!r} is not supported; supported: "
                              f"{', '.join(MERGEKIT_METHODS)}", path)
    entries = data.get("models") or []
    base = data.get("base_model")
    models, weights, per_model = [], [], {}
    for entry in entries:
        name = entry["model"] if isinstance(entry, dict) else entry
        if name == base:  # mergekit lists the base among the models for some methods
            continue
        params = (entry.get("parameters") or {}) if isinstance(entry, dict) else {}
        models.append(str(name))
        weights.append(float(params.get("weight", 1.0)))
        for key, value in params.items():
            if key != "weight":
                per_model.setdefault(key, set()).add(value)
    global_params = dict(data.get("parameters") or {})
    for key, values in per_model.items():
        if len(values) > 1:
            raise InvalidArgument(f"per-model {key} differs between models; weightlab takes one {key} for all", path)
        global_params.setdefault(key, values.pop())
    if global_params.get("normalize") is False and method in ("ties", "dare-ties", "breadcrumbs-ties", "average"):
        raise InvalidArgument("normalize: false is not supported (weightlab's TIES/average always normalise)", path)
    unknown_params = set(global_params) - set(PARAM_KEYS) - MERGEKIT_NOOP_PARAMETERS
    if unknown_params:
        raise InvalidArgument(f"mergekit parameters not supported: {', '.join(sorted(unknown_params))}", path)
    values = {k: global_params.get(k) for k in PARAM_KEYS}
    if method == "slerp" and base:  # mergekit interpolates from base_model (t = 0) to the other model
        models, base = [str(base), *models], None
    takes_weights = method not in ("slerp", "model-stock")
    out = {"method": method, "base": str(base) if base else None, "models": models,
           "weights": weights if takes_weights and any(w != 1.0 for w in weights) else None}
    out["param_values"] = {k: v for k, v in values.items() if v is not None}
    dtype = data.get("out_dtype") or data.get("dtype")
    if dtype:
        out["dtype"] = str(dtype)
    return out
