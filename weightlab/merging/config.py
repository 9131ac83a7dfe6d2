"""What to merge and how: typed, validated once, from options or a YAML file (ours or mergekit's).

Unknown keys and parameters a method does not use are errors, never silently ignored. Every
merge output carries its config as `weightlab_merge.yml` in the same vocabulary (`record_yaml`),
so `weightlab merge --config OUT/weightlab_merge.yml -o OUT2` makes OUT again, byte for byte.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from weightlab.domains import SEED, Choice, Int, Real
from weightlab.errors import CheckpointNotFound, InvalidArgument, shown
from weightlab.io.writer import parse_size
from weightlab.io.yaml_file import read_yaml
from weightlab.merging.methods import METHODS, MergeMethod, mergekit_names, parameter_names
from weightlab.merging.modifiers import MODIFIERS
from weightlab.merging.params import MAX_COEFFICIENT, Param, Params, resolve
from weightlab.options import NanOptions

OUTPUT_DTYPES = ("float32", "float16", "bfloat16", "float64")
OUR_KEYS = {
    "method",
    "base",
    "models",
    "weights",
    "coeff",
    "nan",
    "seed",
    "dtype",
    "modifiers",  # and every parameter
    "shard_size",
    "donor",
    "as_adapter",
    "max_rank",
    "calibration",
    "calibration_sha256",
    "tokenizer",
}
RECORD = "weightlab_merge.yml"
# mergekit parameters we accept as no-ops (they only tune mergekit's memory use)
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
    params: dict[str, Any] = field(default_factory=dict)  # the method parameters given, by name (`lambda`, …)
    seed: int = 0
    dtype: str | None = None  # output dtype; default: each tensor's dtype in the base
    modifiers: list[str] = field(default_factory=list)  # steps on the merged task vector: svc, lines
    shard_size: str | None = None  # largest output shard, as written (default 5GB)
    donor: str | None = None  # config and tokenizer copied from here (default: the base)
    as_adapter: bool = False  # LoRA adapters in, one adapter out (`merge.adapters`)
    max_rank: int | None = None  # with as_adapter: each module's best rank-k update
    calibration: list[str] | None = None  # data-aware methods: one text file for all models, or one per model
    calibration_sha256: list[str] | None = None  # their fingerprints, once read (a replayed record checks them)
    tokenizer: str | None = None  # the tokenizer folder for the calibration text (default: found among the inputs)
    auto_lambda: bool = False  # λ chosen per tensor from the task vectors (`lambda: auto`; `merging.run.auto_lambda`)
    resolved: Params = field(init=False, repr=False, compare=False)  # the parameters, resolved once

    def __post_init__(self) -> None:
        Choice(*METHODS).check("--method", self.method)
        if self.spec.nan:
            self.coeff = "nan"
        self.validate()

    @property
    def spec(self) -> MergeMethod:
        return METHODS[self.method]

    def declared(self) -> tuple[Param, ...]:
        """The parameters the method and its modifiers declare."""
        return self.spec.params + tuple(p for m in self.modifiers for p in MODIFIERS[m].params)

    def validate(self) -> None:
        if not isinstance(self.models, list) or not all(isinstance(m, str) and m for m in self.models):
            raise InvalidArgument("models must be a list of paths")
        if self.base is not None and not (isinstance(self.base, str) and self.base):
            raise InvalidArgument("base must be a path")
        spec = self.spec
        n = len(self.models)
        if n < spec.min_models or (spec.max_models and n > spec.max_models):
            wanted = spec.min_models if spec.min_models == spec.max_models else f"at least {spec.min_models}"
            raise InvalidArgument(f"{self.method} merges {wanted} models, got {n}")
        if spec.needs_base and not self.base:
            raise InvalidArgument(f"{self.method} needs --base (task vectors are relative to it)")
        if not isinstance(self.modifiers, list) or not all(isinstance(m, str) for m in self.modifiers):
            raise InvalidArgument("modifiers must be a list of names")
        for name in self.modifiers:
            Choice(*MODIFIERS).check("modifier", name)
            if not self.base:
                raise InvalidArgument(f"{name} changes the merged task vector, so it needs --base")
        if len(set(self.modifiers)) != len(self.modifiers):
            raise InvalidArgument(f"a modifier is given twice: {', '.join(self.modifiers)}")
        if not isinstance(self.params, dict):
            raise InvalidArgument("params must be a mapping of parameter names to values")
        if self.params.get("lambda") == "auto":  # a str, from YAML, the CLI or Python
            self.params = {k: v for k, v in self.params.items() if k != "lambda"}
            self.auto_lambda = True
        if self.auto_lambda and not (spec.needs_base and spec.param("lambda")):
            with_auto = ", ".join(m.name for m in METHODS.values() if m.needs_base and m.param("lambda"))
            raise InvalidArgument(
                f"--lambda auto scales an update of the base; {self.method} has none to scale (methods: {with_auto})"
            )
        # every given parameter declared by the method or a modifier, and within its domain: once
        self.resolved = resolve(self.declared(), self.params, " + ".join([self.method, *self.modifiers]))
        if self.weights is not None:
            if not spec.coefficients:
                raise InvalidArgument(f"{self.method} takes no --weights")
            if len(self.weights) != n:
                raise InvalidArgument(f"--weights has {len(self.weights)} values for {n} models")
            if self.coeff == "nan":
                raise InvalidArgument("--weights and --coeff nan both set the coefficients; use one")
        if self.coeff not in ("manual", "nan"):
            raise InvalidArgument(f"--coeff {self.coeff!r}: choose manual or nan")
        if self.coeff == "nan":
            if not spec.coefficients:
                raise InvalidArgument(f"{self.method} takes no coefficients, so --coeff nan does not apply")
            if self.nan.norm_of == "task-vectors" and not self.base:
                raise InvalidArgument("NAN on task vectors needs --base")
        Choice(*OUTPUT_DTYPES, optional=True).check("--dtype", self.dtype)
        SEED.check("--seed", self.seed)
        Int(1, optional=True).check("--max-rank", self.max_rank)
        self._validate_calibration()
        if self.max_rank is not None and not self.as_adapter:
            raise InvalidArgument("--max-rank bounds an adapter's rank: it needs --as-adapter")
        if self.as_adapter:
            for flag, given in (
                ("--coeff nan", self.coeff == "nan"),
                ("--svc/--lines", bool(self.modifiers)),
                ("--dtype", self.dtype),
            ):
                if given:
                    raise InvalidArgument(f"{flag} does not apply to --as-adapter")
        for name, value in (("shard_size", self.shard_size), ("donor", self.donor)):
            if value is not None and not (isinstance(value, str) and value):
                raise InvalidArgument(f"{name} must be a string")
            if value is not None and self.as_adapter:
                raise InvalidArgument(
                    f"--{name.replace('_', '-')} does not apply to --as-adapter (one adapter file, "
                    "with no config to copy)"
                )
        if self.shard_size is not None:
            parse_size(self.shard_size)
        if self.weights is not None:
            for w in self.weights:
                Real(-MAX_COEFFICIENT, MAX_COEFFICIENT).check("--weights", w)
            if spec.normalises and (min(self.weights) < 0 or sum(self.weights) <= 0):
                raise InvalidArgument(
                    f"--weights {','.join(f'{w:g}' for w in self.weights)}: {self.method} divides by "
                    "the sum of the weights, so they must be non-negative with a positive sum"
                )

    def _validate_calibration(self) -> None:
        kind = self.spec.calibration
        if self.calibration is not None and (
            not isinstance(self.calibration, list) or not all(isinstance(c, str) and c for c in self.calibration)
        ):
            raise InvalidArgument("calibration must be a list of text files")
        if kind and not self.calibration:
            raise InvalidArgument(
                f"{self.method} runs the models on a little text: give --calibration FILE (one text per line, "
                'or a .jsonl of {"text": ...})'
            )
        if not kind:
            for flag, given in (("--calibration", self.calibration), ("--tokenizer", self.tokenizer)):
                if given:
                    data_aware = ", ".join(m.name for m in METHODS.values() if m.calibration)
                    raise InvalidArgument(
                        f"{flag} is for the data-aware methods ({data_aware}); {self.method} uses no data"
                    )
        elif self.calibration is not None and len(self.calibration) not in (1, len(self.models)):
            raise InvalidArgument(
                f"--calibration was given {len(self.calibration)} times for {len(self.models)} models: "
                "give one file for all, or one per model"
            )
        if self.as_adapter and kind:
            raise InvalidArgument(f"{self.method} runs full models: merge without --as-adapter")

    def record(self) -> dict[str, Any]:
        """This config in the vocabulary `--config` reads (`load_config`), every parameter spelt out
        at its resolved value: what `weightlab_merge.yml` holds, to make the output again."""
        values = self.resolved.as_dict()
        out: dict[str, Any] = {"method": self.method, "base": self.base, "models": list(self.models)}
        out["weights"] = None if self.weights is None else list(self.weights)
        if self.coeff == "nan" and not self.spec.nan:
            out["coeff"] = "nan"
        if self.coeff == "nan":
            out["nan"] = asdict(self.nan)
        out["modifiers"] = list(self.modifiers) or None
        out.update({p.name: values[p.field] for p in self.declared()})
        if self.auto_lambda:
            out["lambda"] = "auto"
        if self.spec.random:
            out["seed"] = self.seed
        for key in ("dtype", "shard_size", "donor", "max_rank", "calibration", "calibration_sha256", "tokenizer"):
            out[key] = getattr(self, key)
        out["as_adapter"] = self.as_adapter or None
        return {k: v for k, v in out.items() if v is not None}

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "base": self.base,
            "models": self.models,
            "weights": self.weights,
            "coeff": self.coeff,
            "nan": asdict(self.nan) if self.coeff == "nan" else None,
            "params": {**self.resolved.as_dict(), **({"lam": "auto"} if self.auto_lambda else {})},
            "seed": self.seed,
            "dtype": self.dtype,
            **({"modifiers": self.modifiers} if self.modifiers else {}),
            **{
                k: getattr(self, k)
                for k in ("shard_size", "donor", "max_rank", "calibration", "calibration_sha256", "tokenizer")
                if getattr(self, k) is not None
            },
            **({"as_adapter": True} if self.as_adapter else {}),
        }


def record_yaml(config: MergeConfig) -> str:
    """The text of `weightlab_merge.yml` for `config` (keys in a fixed order: the same bytes each time)."""
    header = "# weightlab merge --config THIS_FILE -o OUT makes this output again\n"
    return header + str(yaml.safe_dump(config.record(), sort_keys=False, allow_unicode=True))


def from_record(record: dict[str, Any]) -> MergeConfig:
    """The config of a merge record (`MergeConfig.to_dict()` in a `weightlab_merge.json`): the
    method's parameters and its modifiers' (svc_alpha, lines_beta) by their names."""
    spec = METHODS[record["method"]]
    modifiers = list(record.get("modifiers") or [])
    declared = spec.params + tuple(p for m in modifiers for p in MODIFIERS[m].params)
    stored = record.get("params") or {}
    return MergeConfig(
        record["method"],
        list(record["models"]),
        record.get("base"),
        record.get("weights"),
        record.get("coeff", "manual"),
        NanOptions(**record["nan"]) if record.get("nan") else NanOptions(),
        {p.name: stored[p.field] for p in declared if p.field in stored},  # "lam": "auto" comes back as lambda: auto
        record.get("seed", 0),
        record.get("dtype"),
        modifiers,
        record.get("shard_size"),
        record.get("donor"),
        bool(record.get("as_adapter")),
        record.get("max_rank"),
        record.get("calibration"),
        record.get("calibration_sha256"),
        record.get("tokenizer"),
    )


def build_config(options: dict[str, Any]) -> MergeConfig:
    """A validated `MergeConfig` from keyword options, with method parameters given as
    `param_values` by name (lambda, density, gamma, …)."""
    options = dict(options)
    options["params"] = options.pop("param_values", {})
    return MergeConfig(**options)


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML merge config as options for `build_config` (mergekit's format too). Every
    value's type is checked here; its domain when the config is built."""
    if not Path(path).exists():
        raise CheckpointNotFound("--config: no such file", path)
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise InvalidArgument("a merge config is a mapping of keys to values", path)
    return _from_mergekit(data, path) if "merge_method" in data else _from_ours(data, path)


def _typed(value: Any, kind: str, where: str, path: str | Path) -> Any:
    """`value` if it is of `kind` (str, number, int, mapping, list), else a one-line error naming `where`."""
    ok = {
        "str": isinstance(value, str),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "mapping": isinstance(value, dict),
        "list": isinstance(value, list),
        "bool": isinstance(value, bool),
    }[kind]
    if not ok:
        article = "an" if kind[0] in "aeiou" else "a"
        raise InvalidArgument(f"{where} must be {article} {kind}, got {type(value).__name__} {shown(value)}", path)
    return value


def _models(entries: Any, key: str, path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """[(model path, its mapping's other keys)] from a list of paths or of {model: path, ...}."""
    out = []
    for i, entry in enumerate(_typed(entries, "list", key, path)):
        if isinstance(entry, dict):
            if "model" not in entry:
                raise InvalidArgument(f"{key}[{i}] has no 'model' key", path)
            out.append(
                (
                    _typed(entry["model"], "str", f"{key}[{i}].model", path),
                    {k: v for k, v in entry.items() if k != "model"},
                )
            )
        else:
            out.append((_typed(entry, "str", f"{key}[{i}]", path), {}))
    return out


def _from_ours(data: dict[str, Any], path: str | Path) -> dict[str, Any]:
    known = OUR_KEYS | set(parameter_names())
    unknown = set(data) - known
    if unknown:
        raise InvalidArgument(
            f"unknown keys {', '.join(sorted(map(str, unknown)))} (known: {', '.join(sorted(known))})", path
        )
    kinds = {
        "method": "str",
        "base": "str",
        "coeff": "str",
        "seed": "int",
        "dtype": "str",
        "modifiers": "list",
        "shard_size": "str",
        "donor": "str",
        "as_adapter": "bool",
        "max_rank": "int",
        "tokenizer": "str",
    }
    out = {k: _typed(data[k], kind, k, path) for k, kind in kinds.items() if data.get(k) is not None}
    for key in ("calibration", "calibration_sha256"):
        if data.get(key) is not None:
            value = [data[key]] if isinstance(data[key], str) else _typed(data[key], "list", key, path)
            out[key] = [_typed(v, "str", f"{key}[{i}]", path) for i, v in enumerate(value)]
    models = _models(data.get("models") or [], "models", path)
    for i, (_, extra) in enumerate(models):
        if set(extra) - {"weight"}:
            raise InvalidArgument(f"models[{i}] has unknown keys {', '.join(sorted(set(extra) - {'weight'}))}", path)
    out["models"] = [m for m, _ in models]
    if any("weight" in extra for _, extra in models):
        out["weights"] = [
            _typed(extra.get("weight", 1.0), "number", f"models[{i}].weight", path)
            for i, (_, extra) in enumerate(models)
        ]
    if data.get("weights") is not None:
        if "weights" in out:
            raise InvalidArgument("weights are given twice (per model and as 'weights')", path)
        out["weights"] = [
            _typed(w, "number", f"weights[{i}]", path)
            for i, w in enumerate(_typed(data["weights"], "list", "weights", path))
        ]
    if "nan" in data:
        nan = _typed(data["nan"] or {}, "mapping", "nan", path)
        bad = set(nan) - {f.name for f in fields(NanOptions)}
        if bad:
            raise InvalidArgument(f"unknown nan options {', '.join(sorted(map(str, bad)))}", path)
        out["nan"] = NanOptions(**nan)
        if out.get("coeff") != "nan" and out.get("method") != "nan":
            raise InvalidArgument(
                "a nan: block needs coeff: nan (or method: nan); without it the settings would be ignored", path
            )
    out["param_values"] = {
        k: data[k] if (k, data[k]) == ("lambda", "auto") else _typed(data[k], "number", k, path)
        for k in parameter_names()
        if data.get(k) is not None
    }
    return out


def _from_mergekit(data: dict[str, Any], path: str | Path) -> dict[str, Any]:
    unknown = set(data) - MERGEKIT_KEYS
    if unknown:
        raise InvalidArgument(f"mergekit keys not supported here: {', '.join(sorted(map(str, unknown)))}", path)
    method_name = _typed(data["merge_method"], "str", "merge_method", path)
    method = mergekit_names().get(method_name)
    if method is None:
        raise InvalidArgument(
            f"mergekit merge_method {method_name!r} is not supported; supported: {', '.join(mergekit_names())}", path
        )
    base = data.get("base_model")
    if base is not None:
        base = _typed(base, "str", "base_model", path)
    models: list[str] = []
    weights: list[float] = []
    per_model: dict[str, list[Any]] = {}
    for i, (name, extra) in enumerate(_models(data.get("models") or [], "models", path)):
        if name == base:  # mergekit lists the base among the models for some methods
            continue
        params = _typed(extra.get("parameters") or {}, "mapping", f"models[{i}].parameters", path)
        models.append(name)
        weights.append(_typed(params.get("weight", 1.0), "number", f"models[{i}].parameters.weight", path))
        for key, value in params.items():
            if key != "weight":
                per_model.setdefault(key, []).append(value)
    global_params = dict(_typed(data.get("parameters") or {}, "mapping", "parameters", path))
    for key, values in per_model.items():
        if any(v != values[0] for v in values):
            raise InvalidArgument(f"per-model {key} differs between models; weightlab takes one {key} for all", path)
        global_params.setdefault(key, values[0])
    if global_params.get("normalize") is False and METHODS[method].normalises:
        raise InvalidArgument("normalize: false is not supported (weightlab's TIES/average always normalise)", path)
    unknown_params = set(global_params) - set(parameter_names()) - MERGEKIT_NOOP_PARAMETERS
    if unknown_params:
        raise InvalidArgument(f"mergekit parameters not supported: {', '.join(sorted(map(str, unknown_params)))}", path)
    param_values = {
        k: _typed(global_params[k], "number", f"parameters.{k}", path) for k in parameter_names() if k in global_params
    }
    if method == "slerp" and base:  # mergekit interpolates from base_model (t = 0) to the other model
        models, base = [base, *models], None
    out = {
        "method": method,
        "base": base,
        "models": models,
        "weights": weights if METHODS[method].coefficients and any(w != 1.0 for w in weights) else None,
        "param_values": param_values,
    }
    dtype = data.get("out_dtype") or data.get("dtype")
    if dtype:
        out["dtype"] = _typed(dtype, "str", "out_dtype" if data.get("out_dtype") else "dtype", path)
    return out
