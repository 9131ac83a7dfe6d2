"""What to merge and how: typed, validated once, from options or a YAML file (ours or mergekit's).

Unknown keys and parameters a method does not use are errors, never silently ignored. Every
merge output carries its config as `weightlab_merge.yml` in the same vocabulary (`record_yaml`),
so `weightlab merge --config OUT/weightlab_merge.yml -o OUT2` makes OUT again, byte for byte.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from weightlab.domains import SEED, Choice, Int, Real, typed
from weightlab.errors import InvalidArgument, shown
from weightlab.io.writer import parse_size
from weightlab.merging.layout import Origin, Slice, SliceSource
from weightlab.merging.methods import METHODS, MergeMethod, parameter_names
from weightlab.merging.modifiers import MODIFIERS
from weightlab.merging.params import MAX_COEFFICIENT, WEIGHT, Param, Params, check_setting, declared_param, resolve
from weightlab.merging.settings import dumped, first_given, parse, values_of, varies
from weightlab.merging.vocabulary import SOURCES, TokenRow, Vocabulary
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
    "match_experts",
    "max_rank",
    "calibration",
    "calibration_sha256",
    "tokenizer",
    "vocabulary",
    "chat_template",
}
RECORD = "weightlab_merge.yml"


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
    model_params: list[dict[str, Any]] | None = None  # per model: its own settings (weight, density, …)
    slices: list[Slice] | None = None  # output layers from layer ranges of the models (`merging.layout`)
    vocabulary: Vocabulary | None = None  # one vocabulary for models whose tokenizers differ (`merging.vocabulary`)
    chat_template: str | None = None  # the output tokenizer's: "auto" (the models' most common) or Jinja text
    match_experts: bool = False  # MoE experts matched to the reference's before merging (`merging.expert_matching`)
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

    @property
    def uses_base(self) -> bool:
        """Whether the merge reads a base: the method needs one, or takes one when given."""
        return self.spec.needs_base or (self.spec.optional_base and self.base is not None)

    def merged_counts(self) -> list[int]:
        """How many models each output tensor merges (besides the base): per slice with slices."""
        if not self.slices:
            return [len(self.models)]
        return [
            len(s.sources) - int(self.uses_base and (s.base or self.base) in [src.model for src in s.sources])
            for s in self.slices
        ]

    def validate(self) -> None:
        if not isinstance(self.models, list) or not all(isinstance(m, str) and m for m in self.models):
            raise InvalidArgument("models must be a list of paths")
        if self.base is not None and not (isinstance(self.base, str) and self.base):
            raise InvalidArgument("base must be a path")
        spec = self.spec
        n = len(self.models)
        for count in self.merged_counts():
            if count < spec.min_models or (spec.max_models and count > spec.max_models):
                wanted = spec.min_models if spec.min_models == spec.max_models else f"at least {spec.min_models}"
                where = " in a slice" if self.slices else ""
                raise InvalidArgument(f"{self.method} merges {wanted} models{where}, got {count}")
        if spec.needs_base and not self.base and not (self.slices and all(s.base for s in self.slices)):
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
        owner = " + ".join([self.method, *self.modifiers])
        if "weight" in self.params:  # one weight for every model (mergekit's global `weight`)
            if not spec.coefficients:
                raise InvalidArgument(f"{self.method} takes no weights")
            check_setting(WEIGHT, self.params["weight"], "weight")
        self.resolved = resolve(self.declared(), {k: v for k, v in self.params.items() if k != "weight"}, owner)
        self._validate_model_params(owner)
        if self.slices is not None:
            self._validate_slices(owner)
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
        self._validate_vocabulary()
        if self.max_rank is not None and not self.as_adapter:
            raise InvalidArgument("--max-rank bounds an adapter's rank: it needs --as-adapter")
        if not isinstance(self.match_experts, bool):
            raise InvalidArgument(f"match_experts must be true or false, got {shown(self.match_experts)}")
        if self.match_experts and (self.as_adapter or self.slices):
            raise InvalidArgument(
                "--match-experts reorders whole models' experts: it does not apply to "
                + ("--as-adapter (an adapter's factors are not reordered)" if self.as_adapter else "slices")
            )
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

    def renamed(self, paths: dict[str, str]) -> MergeConfig:
        """This config with the models (and base, slices' sources, vocabulary rows) named in `paths`
        read from where `paths` says (a stage's output)."""

        def at(m: str) -> str:
            return paths.get(m, m)

        def maybe(m: str | None) -> str | None:
            return None if m is None else at(m)

        slices = None
        if self.slices is not None:
            slices = [
                replace(s, sources=tuple(replace(src, model=at(src.model)) for src in s.sources), base=maybe(s.base))
                for s in self.slices
            ]
        vocabulary = self.vocabulary
        if vocabulary is not None:
            vocabulary = replace(
                vocabulary,
                source=at(vocabulary.source),
                tokens={t: replace(row, model=maybe(row.model)) for t, row in vocabulary.tokens.items()},
            )
        return replace(
            self,
            models=[at(m) for m in self.models],
            base=maybe(self.base),
            slices=slices,
            vocabulary=vocabulary,
            donor=maybe(self.donor),
        )

    def per_model_names(self) -> set[str]:
        """What a model's own settings may set: its weight (where the method takes weights) and the
        parameters the method takes per model."""
        return {p.name for p in self.declared() if p.per_model} | ({"weight"} if self.spec.coefficients else set())

    def _check_model_settings(self, settings: Any, where: str, owner: str) -> None:
        if not isinstance(settings, dict):
            raise InvalidArgument(f"{where} must be a mapping of parameter names to settings")
        for name, setting in settings.items():
            if name not in self.per_model_names():
                per_model = ", ".join(sorted(self.per_model_names())) or "nothing"
                raise InvalidArgument(
                    f"{where}: {name} is one value for all models: give it with the method's parameters"
                    if any(p.name == name for p in self.declared())
                    else f"{where}: {owner} does not use {name} (per model: {per_model})"
                )
            if name == "weight":
                for value in values_of(setting):
                    Real(-MAX_COEFFICIENT, MAX_COEFFICIENT).check(f"{where}.weight", value)
            else:
                check_setting(declared_param(self.declared(), name, owner), setting, f"{where}.{name}")

    def _validate_model_params(self, owner: str) -> None:
        if self.model_params is None:
            return
        if not isinstance(self.model_params, list) or len(self.model_params) != len(self.models):
            raise InvalidArgument(f"model_params must hold one mapping per model ({len(self.models)})")
        for i, settings in enumerate(self.model_params):
            self._check_model_settings(settings, f"models[{i}]", owner)
        if self.weights is not None and any("weight" in m for m in self.model_params):
            raise InvalidArgument("weights are given twice (per model and as weights)")

    def _validate_slices(self, owner: str) -> None:
        if not isinstance(self.slices, list) or not self.slices:
            raise InvalidArgument("slices must be a non-empty list")
        if self.model_params is not None or self.weights is not None:
            raise InvalidArgument("with slices, each model's settings go with its source in the slice")
        for i, s in enumerate(self.slices):
            for name, setting in s.params.items():
                check_setting(declared_param((*self.declared(), WEIGHT), name, owner), setting, f"slices[{i}].{name}")
            for j, src in enumerate(s.sources):
                self._check_model_settings(src.params, f"slices[{i}].sources[{j}]", owner)

    def tensor_params(self, name: str, origin: Origin, inputs: list[str]) -> tuple[Params, list[float]]:
        """The parameters and the models' weights for output tensor `name`: each setting (a value, a
        gradient over the layers, filters on the name) at its place (`origin`: slice and t); a
        model's own settings are read on its own name of the tensor (`inputs`), as mergekit reads them."""
        spec = self.spec
        shared_scopes: list[dict[str, Any] | None] = [self.params]
        model_scopes: list[list[dict[str, Any] | None]] = [
            [self.model_params[i] if self.model_params else None, self.params] for i in range(len(inputs))
        ]
        if self.slices is not None and origin.slice is not None:
            s = self.slices[origin.slice]
            sources = [src for src in s.sources if not (self.uses_base and src.model == (s.base or self.base))]
            shared_scopes = [s.params, self.params]
            model_scopes = [[src.params, s.params, self.params] for src in sources]
        values = self.resolved.as_dict()
        per_model: dict[str, tuple[Any, ...]] = {}
        for p in self.declared():
            if p.per_model:
                each = [first_given(scopes, p.name, inputs[i], origin.t) for i, scopes in enumerate(model_scopes)]
                per_model[p.field] = tuple(p.default if v is None else v for v in each)
            elif (found := first_given(shared_scopes, p.name, name, origin.t)) is not None:
                values[p.field] = found
        if not spec.coefficients:
            return Params(values, per_model), [1.0] * len(inputs)
        fixed = list(self.weights) if self.weights is not None else [1.0] * len(inputs)
        weights = []
        for i, scopes in enumerate(model_scopes):
            given = first_given(scopes, "weight", inputs[i], origin.t)
            weights.append(fixed[i] if given is None else float(given))
        return Params(values, per_model), weights

    @property
    def varies_by_tensor(self) -> bool:
        """Whether any parameter or weight can differ between tensors (else `resolved` and the weights hold)."""
        return bool(
            self.slices or self.model_params or "weight" in self.params or any(varies(v) for v in self.params.values())
        )

    def referenced(self) -> list[str]:
        """Every model the merge reads: the base, the models, the slices' sources."""
        found = [*([self.base] if self.base else []), *self.models]
        for s in self.slices or []:
            found += [src.model for src in s.sources] + ([s.base] if s.base else [])
        return list(dict.fromkeys(found))

    def _validate_vocabulary(self) -> None:
        if self.chat_template is not None and not (isinstance(self.chat_template, str) and self.chat_template):
            raise InvalidArgument("chat_template must be auto or a Jinja template's text")
        if self.chat_template not in (None, "auto") and "{" not in self.chat_template:
            raise InvalidArgument(
                f"chat_template {shown(self.chat_template)}: give auto or the template's Jinja text (named templates "
                "are mergekit's files, not weightlab's)"
            )
        v = self.vocabulary
        if v is None:
            return
        models = self.referenced()
        if v.source not in (*SOURCES, *models):
            raise InvalidArgument(f"vocabulary source {shown(v.source)}: base, union or one of the merged models")
        for token, row in v.tokens.items():
            if row.model is not None and row.model not in models:
                raise InvalidArgument(f"the row of token {token!r} comes from {row.model}, which is not merged")
        if v.pad_to_multiple_of is not None:
            Int(1, 1 << 20).check("pad_to_multiple_of", v.pad_to_multiple_of)
        for flag, given in (("--as-adapter", self.as_adapter), ("--calibration", self.calibration)):
            if given:
                raise InvalidArgument(f"aligning vocabularies does not apply with {flag}")

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
        """This config in the vocabulary `--config` reads (`recipes.load_config`), every parameter spelt out
        (a setting that varies over the tensors as given, the others at their resolved value): what
        `weightlab_merge.yml` holds, to make the output again."""
        values = self.resolved.as_dict()
        out: dict[str, Any] = {"method": self.method, "base": self.base}
        if self.slices is not None:
            out["slices"] = [_dumped_slice(s) for s in self.slices]
        elif self.model_params is not None:
            out["models"] = [{"model": m, **_dumped(own)} for m, own in zip(self.models, self.model_params)]
        else:
            out["models"] = list(self.models)
        out["weights"] = None if self.weights is None else list(self.weights)
        if self.coeff == "nan" and not self.spec.nan:
            out["coeff"] = "nan"
        if self.coeff == "nan":
            out["nan"] = asdict(self.nan)
        out["modifiers"] = list(self.modifiers) or None
        out.update(
            {p.name: dumped(self.params[p.name]) if p.name in self.params else values[p.field] for p in self.declared()}
        )
        if "weight" in self.params:
            out["weight"] = dumped(self.params["weight"])
        if self.auto_lambda:
            out["lambda"] = "auto"
        if self.spec.random:
            out["seed"] = self.seed
        out["vocabulary"] = self.vocabulary.record() if self.vocabulary is not None else None
        out["chat_template"] = self.chat_template
        for key in ("dtype", "shard_size", "donor", "max_rank", "calibration", "calibration_sha256", "tokenizer"):
            out[key] = getattr(self, key)
        out["as_adapter"] = self.as_adapter or None
        out["match_experts"] = self.match_experts or None
        return {k: v for k, v in out.items() if v is not None}

    def to_dict(self) -> dict[str, Any]:
        given = {k: dumped(v) for k, v in self.params.items() if varies(v) or k == "weight"}
        return {
            "method": self.method,
            "base": self.base,
            "models": self.models,
            "weights": self.weights,
            "coeff": self.coeff,
            "nan": asdict(self.nan) if self.coeff == "nan" else None,
            "params": {**self.resolved.as_dict(), **({"lam": "auto"} if self.auto_lambda else {})},
            **({"param_settings": given} if given else {}),
            **({"model_params": [_dumped(m) for m in self.model_params]} if self.model_params is not None else {}),
            **({"slices": [_dumped_slice(s) for s in self.slices]} if self.slices is not None else {}),
            **({"vocabulary": self.vocabulary.record()} if self.vocabulary is not None else {}),
            **({"chat_template": self.chat_template} if self.chat_template is not None else {}),
            "seed": self.seed,
            "dtype": self.dtype,
            **({"modifiers": self.modifiers} if self.modifiers else {}),
            **{
                k: getattr(self, k)
                for k in ("shard_size", "donor", "max_rank", "calibration", "calibration_sha256", "tokenizer")
                if getattr(self, k) is not None
            },
            **({"as_adapter": True} if self.as_adapter else {}),
            **({"match_experts": True} if self.match_experts else {}),
        }


def _dumped(settings: dict[str, Any]) -> dict[str, Any]:
    return {name: dumped(setting) for name, setting in settings.items()}


def _dumped_slice(s: Slice) -> dict[str, Any]:
    """A slice in our YAML's words: `sources` of {model, layers, settings}, then `base`, then settings."""
    sources = [{"model": src.model, "layers": list(src.layers), **_dumped(src.params)} for src in s.sources]
    return {"sources": sources, **({"base": s.base} if s.base else {}), **_dumped(s.params)}


def _parsed_settings(data: dict[str, Any], keys: set[str], where: str, path: str | Path) -> dict[str, Any]:
    """The settings among `data`'s keys (`settings.parse`); a key that is no parameter is refused."""
    out = {}
    for key, value in data.items():
        if key in keys:
            continue
        if key not in set(parameter_names()) | {"weight"}:
            raise InvalidArgument(f"{where} has unknown key {shown(key)}", path)
        try:
            out[key] = parse(value, f"{where}.{key}")
        except InvalidArgument as e:
            raise InvalidArgument(e.message, path) from None
    return out


def vocabulary_of(data: Any, path: str | Path) -> Vocabulary:
    """A `vocabulary:` block (ours; mergekit's `tokenizer:` reads the same after `mergekit.read_recipe`):
    `source`, `tokens` (each `{model, token, token_id, force}`, model null for zeros), `pad_to_multiple_of`."""
    if isinstance(data, str):
        return Vocabulary(data)
    data = typed(data, "mapping", "vocabulary", path)
    unknown = set(data) - {"source", "tokens", "pad_to_multiple_of"}
    if unknown:
        raise InvalidArgument(f"vocabulary has unknown keys {', '.join(sorted(map(str, unknown)))}", path)
    tokens = {}
    for token, row in typed(data.get("tokens") or {}, "mapping", "vocabulary.tokens", path).items():
        row = typed(row, "mapping", f"vocabulary.tokens[{token!r}]", path)
        bad = set(row) - {"model", "token", "token_id", "force"}
        if bad or not isinstance(token, str):
            raise InvalidArgument(
                f"vocabulary.tokens[{shown(token)}] has unknown keys {', '.join(sorted(map(str, bad)))}", path
            )
        tokens[token] = TokenRow(
            typed(row["model"], "str", "model", path) if row.get("model") is not None else None,
            typed(row["token"], "str", "token", path) if row.get("token") is not None else None,
            typed(row["token_id"], "int", "token_id", path) if row.get("token_id") is not None else None,
            typed(row.get("force", False), "bool", "force", path),
        )
    pad = data.get("pad_to_multiple_of")
    return Vocabulary(
        typed(data.get("source", "union"), "str", "vocabulary.source", path),
        tokens,
        typed(pad, "int", "pad_to_multiple_of", path) if pad is not None else None,
    )


def _slice_of(data: Any, i: int, path: str | Path) -> Slice:
    where = f"slices[{i}]"
    if not isinstance(data, dict) or not isinstance(data.get("sources"), list) or not data["sources"]:
        raise InvalidArgument(f"{where} needs sources: a list of {{model, layers}}", path)
    sources = []
    for j, src in enumerate(data["sources"]):
        at = f"{where}.sources[{j}]"
        if not isinstance(src, dict) or "model" not in src or "layers" not in src:
            raise InvalidArgument(f"{at} needs model and layers", path)
        span = src["layers"]
        if not (isinstance(span, list) and len(span) == 2 and all(type(x) is int for x in span)):
            raise InvalidArgument(f"{at}.layers must be [start, end], two integers, got {shown(span)}", path)
        model = typed(src["model"], "str", f"{at}.model", path)
        sources.append(SliceSource(model, (span[0], span[1]), _parsed_settings(src, {"model", "layers"}, at, path)))
    base = typed(data["base"], "str", f"{where}.base", path) if data.get("base") is not None else None
    return Slice(tuple(sources), _parsed_settings(data, {"sources", "base"}, where, path), base)


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
        {
            **{
                p.name: stored[p.field] for p in declared if p.field in stored
            },  # "lam": "auto" comes back as lambda: auto
            **{k: parse(v, k) for k, v in (record.get("param_settings") or {}).items()},
        },
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
        model_params=[{k: parse(v, k) for k, v in m.items()} for m in record["model_params"]]
        if record.get("model_params") is not None
        else None,
        slices=[_slice_of(s, i, "record") for i, s in enumerate(record["slices"])] if record.get("slices") else None,
        vocabulary=vocabulary_of(record["vocabulary"], "record") if record.get("vocabulary") else None,
        chat_template=record.get("chat_template"),
        match_experts=bool(record.get("match_experts")),
    )


def build_config(options: dict[str, Any]) -> MergeConfig:
    """A validated `MergeConfig` from keyword options, with method parameters given as
    `param_values` by name (lambda, density, gamma, …)."""
    options = dict(options)
    options["params"] = options.pop("param_values", {})
    return MergeConfig(**options)


def _models(entries: Any, key: str, path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """[(model path, its mapping's other keys)] from a list of paths or of {model: path, ...}."""
    out = []
    for i, entry in enumerate(typed(entries, "list", key, path)):
        if isinstance(entry, dict):
            if "model" not in entry:
                raise InvalidArgument(f"{key}[{i}] has no 'model' key", path)
            out.append(
                (
                    typed(entry["model"], "str", f"{key}[{i}].model", path),
                    {k: v for k, v in entry.items() if k != "model"},
                )
            )
        else:
            out.append((typed(entry, "str", f"{key}[{i}]", path), {}))
    return out


def read_ours(data: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """A recipe in our vocabulary (`record`'s) as options for `build_config`."""
    known = OUR_KEYS | set(parameter_names()) | {"weight", "slices"}
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
        "match_experts": "bool",
        "max_rank": "int",
        "tokenizer": "str",
    }
    out = {k: typed(data[k], kind, k, path) for k, kind in kinds.items() if data.get(k) is not None}
    for key in ("calibration", "calibration_sha256"):
        if data.get(key) is not None:
            value = [data[key]] if isinstance(data[key], str) else typed(data[key], "list", key, path)
            out[key] = [typed(v, "str", f"{key}[{i}]", path) for i, v in enumerate(value)]
    models = _models(data.get("models") or [], "models", path)
    own = [_parsed_settings(extra, set(), f"models[{i}]", path) for i, (_, extra) in enumerate(models)]
    out["models"] = [m for m, _ in models]
    weights = [settings.get("weight", 1.0) for settings in own]
    if any("weight" in settings for settings in own) and all(not varies(w) for w in weights):
        out["weights"] = [typed(w, "number", f"models[{i}].weight", path) for i, w in enumerate(weights)]
        own = [{k: v for k, v in settings.items() if k != "weight"} for settings in own]
    if any(own):
        out["model_params"] = own
    if data.get("slices") is not None:
        slices = [_slice_of(entry, i, path) for i, entry in enumerate(typed(data["slices"], "list", "slices", path))]
        out["slices"] = slices
        out["models"] = out["models"] or list(
            dict.fromkeys(src.model for s in slices for src in s.sources if src.model != data.get("base"))
        )
    if data.get("weights") is not None:
        if "weights" in out:
            raise InvalidArgument("weights are given twice (per model and as 'weights')", path)
        out["weights"] = [
            typed(w, "number", f"weights[{i}]", path)
            for i, w in enumerate(typed(data["weights"], "list", "weights", path))
        ]
    if data.get("vocabulary") is not None:
        out["vocabulary"] = vocabulary_of(data["vocabulary"], path)
    if data.get("chat_template") is not None:
        out["chat_template"] = typed(data["chat_template"], "str", "chat_template", path)
    if "nan" in data:
        nan = typed(data["nan"] or {}, "mapping", "nan", path)
        bad = set(nan) - {f.name for f in fields(NanOptions)}
        if bad:
            raise InvalidArgument(f"unknown nan options {', '.join(sorted(map(str, bad)))}", path)
        out["nan"] = NanOptions(**nan)
        if out.get("coeff") != "nan" and out.get("method") != "nan":
            raise InvalidArgument(
                "a nan: block needs coeff: nan (or method: nan); without it the settings would be ignored", path
            )
    out["param_values"] = {
        k: data[k] if (k, data[k]) == ("lambda", "auto") else _setting(data[k], k, path)
        for k in (*parameter_names(), "weight")
        if data.get(k) is not None
    }
    return out


def _setting(value: Any, key: str, path: str | Path) -> Any:
    try:
        return parse(value, key)
    except InvalidArgument as e:
        raise InvalidArgument(e.message, path) from None
