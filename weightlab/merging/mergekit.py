"""mergekit's recipe format (`mergekit-yaml`), read as mergekit 0.1.5 reads it and written so that
mergekit reads ours: the same model, or a refusal that says what differs.

Reading: `merge_method` names a registry entry (its `mergekit` name); parameters take mergekit's
forms (values, gradients, filters; `settings`) globally, per slice and per model; where a recipe
says nothing, mergekit's defaults apply (`MergeMethod.mergekit_defaults`, which differ from ours
for some methods: dare_ties does not normalise, DARE rescales to the L1 norm), and a parameter
mergekit requires (a model's `weight`, slerp's `t`) must be given. `base_model` is handled as
mergekit handles it for the method: required, optional, or merged as one more input (linear,
karcher, passthrough). What mergekit itself ignores (`residual_weight`) or weightlab does not do
is refused, naming the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from weightlab.errors import InvalidArgument, shown
from weightlab.merging.layout import Slice, SliceSource
from weightlab.merging.methods import MERGEKIT_REQUIRED, METHODS, MergeMethod, mergekit_names
from weightlab.merging.settings import dumped, parse, varies
from weightlab.merging.vocabulary import TokenRow, Vocabulary

if TYPE_CHECKING:
    from weightlab.merging.config import MergeConfig

KEYS = {
    "merge_method",
    "base_model",
    "models",
    "slices",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
}
MERGEKIT_RECORD = "mergekit_config.yml"  # what mergekit names the recipe it writes beside a merge
NO_EFFECT = {"int8_mask"}  # mergekit's memory settings: the result does not depend on them
DTYPES = {"float16": "float16", "bfloat16": "bfloat16", "float32": "float32", "float64": "float64",
          "fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}  # fmt: skip


def _model(value: Any, where: str, path: str | Path) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"{where} must be a model path or Hub ID, got {shown(value)}", path)
    if "+" in value:
        raise InvalidArgument(
            f"{where}: {value!r} applies a LoRA to a model (mergekit's 'model+lora'); weightlab does not: "
            "give the adapter as the model (it is merged as W + s·B·A on the base)",
            path,
        )
    return value


def _parameters(value: Any, where: str, path: str | Path) -> dict[str, Any]:
    """A `parameters:` mapping, each setting parsed, mergekit's no-op keys dropped."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument(f"{where} must be a mapping of parameter names to settings, got {shown(value)}", path)
    out = {}
    for name, setting in value.items():
        if not isinstance(name, str):
            raise InvalidArgument(f"{where}: {shown(name)} is not a parameter name", path)
        if name in NO_EFFECT:
            parse(setting, f"{where}.{name}")
            continue
        try:
            out[name] = parse(setting, f"{where}.{name}")
        except InvalidArgument as e:
            raise InvalidArgument(e.message, path) from None
    return out


def _translated(spec: MergeMethod, params: dict[str, Any], where: str, path: str | Path) -> dict[str, Any]:
    """mergekit's spellings in ours: `rescale: true/false` is "l1"/"none" (mergekit's rule); a
    parameter mergekit takes for the method but that changes nothing at its value is dropped."""
    out = dict(params)
    if "rescale" in out:
        if spec.param("rescale") is None:
            if out["rescale"] is not False:
                raise InvalidArgument(
                    f"{where}.rescale: {spec.mergekit} with rescale is not supported by weightlab "
                    "(it rescales the random drops of dare, della)",
                    path,
                )
            del out["rescale"]
        elif isinstance(out["rescale"], bool):
            out["rescale"] = "l1" if out["rescale"] else "none"
    return out


def read_recipe(data: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """A mergekit recipe as options for `config.build_config` (mergekit's semantics, spelt out)."""
    unknown = set(data) - KEYS
    if "modules" in data:
        raise InvalidArgument("mergekit's modules: (models of several modules) is not supported", path)
    if unknown:
        raise InvalidArgument(f"mergekit keys not supported here: {', '.join(sorted(map(str, unknown)))}", path)
    name = data.get("merge_method")
    if not isinstance(name, str) or name not in mergekit_names():
        raise InvalidArgument(
            f"mergekit merge_method {shown(name)} is not supported; supported: {', '.join(mergekit_names())}", path
        )
    spec = METHODS[mergekit_names()[name]]
    if ("models" in data) == ("slices" in data):
        raise InvalidArgument("a mergekit recipe has exactly one of models: and slices:", path)
    base = _model(data["base_model"], "base_model", path) if data.get("base_model") is not None else None
    params = _translated(spec, _parameters(data.get("parameters"), "parameters", path), "parameters", path)
    options: dict[str, Any] = {"method": spec.name}
    if data.get("models") is not None:
        options.update(_models(spec, data["models"], base, params, path))
    else:
        options.update(_slices(spec, data["slices"], base, params, path))
    options["param_values"] = {**_defaults(spec, options, params), **params}
    dtype = data.get("out_dtype") or data.get("dtype")
    if dtype is not None:
        if dtype not in DTYPES:
            raise InvalidArgument(f"dtype {shown(dtype)} is not one of {', '.join(DTYPES)}", path)
        options["dtype"] = DTYPES[dtype]
    if data.get("tokenizer_source") is not None and data.get("tokenizer") is not None:
        raise InvalidArgument("give tokenizer_source or tokenizer, not both (mergekit refuses both too)", path)
    if data.get("tokenizer_source") is not None:
        options["vocabulary"] = Vocabulary(_model(data["tokenizer_source"], "tokenizer_source", path))
    if data.get("tokenizer") is not None:
        options["vocabulary"] = _tokenizer_block(data["tokenizer"], path)
    if data.get("chat_template") is not None:
        if not isinstance(data["chat_template"], str):
            raise InvalidArgument(f"chat_template must be text, got {shown(data['chat_template'])}", path)
        options["chat_template"] = data["chat_template"]
    return options


def _tokenizer_block(block: Any, path: str | Path) -> Vocabulary:
    """mergekit's `tokenizer: {source, tokens, pad_to_multiple_of}`; a token's `source` is a model, or
    `{kind: model_token, model, token | token_id}`, or `{kind: zero}`."""
    if not isinstance(block, dict) or set(block) - {"source", "tokens", "pad_to_multiple_of"}:
        raise InvalidArgument(f"tokenizer must be {{source, tokens, pad_to_multiple_of}}, got {shown(block)}", path)
    tokens = {}
    for token, entry in (block.get("tokens") or {}).items():
        where = f"tokenizer.tokens[{token!r}]"
        if not isinstance(entry, dict) or set(entry) - {"source", "force"}:
            raise InvalidArgument(f"{where} must be {{source, force}}, got {shown(entry)}", path)
        source, force = entry.get("source"), entry.get("force", False)
        if not isinstance(force, bool):
            raise InvalidArgument(f"{where}.force must be true or false", path)
        if isinstance(source, str):
            tokens[token] = TokenRow(_model(source, f"{where}.source", path), force=force)
        elif isinstance(source, dict) and source.get("kind") == "zero" and set(source) == {"kind"}:
            tokens[token] = TokenRow(None, force=force)
        elif isinstance(source, dict) and source.get("kind") == "model_token" and "model" in source:
            token_id, text = source.get("token_id"), source.get("token")
            if (token_id is None) == (text is None) or set(source) - {"kind", "model", "token_id", "token"}:
                raise InvalidArgument(f"{where}.source: give one of token and token_id", path)
            tokens[token] = TokenRow(_model(source["model"], f"{where}.source.model", path), text, token_id, force)
        else:
            raise InvalidArgument(f"{where}.source must be a model, {{kind: zero}} or {{kind: model_token, …}}", path)
    pad = block.get("pad_to_multiple_of")
    if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad < 1):
        raise InvalidArgument(f"tokenizer.pad_to_multiple_of must be a positive integer, got {shown(pad)}", path)
    source = block.get("source", "union")
    return Vocabulary(source if source in ("base", "union") else _model(source, "tokenizer.source", path), tokens, pad)


def _models(
    spec: MergeMethod, entries: Any, base: str | None, params: dict[str, Any], path: str | Path
) -> dict[str, Any]:
    if not isinstance(entries, list) or not entries:
        raise InvalidArgument("models must be a non-empty list", path)
    models: list[str] = []
    own: list[dict[str, Any]] = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry:
            raise InvalidArgument(f"models[{i}] has no 'model' key", path)
        extra = set(entry) - {"model", "parameters"}
        if extra:
            raise InvalidArgument(
                f"models[{i}] has keys mergekit does not read: {', '.join(sorted(map(str, extra)))}", path
            )
        model = _model(entry["model"], f"models[{i}].model", path)
        settings = _translated(spec, _parameters(entry.get("parameters"), f"models[{i}].parameters", path),
                               f"models[{i}].parameters", path)  # fmt: skip
        if model == base and spec.mergekit_base != "input":
            continue  # the base is no model to merge; mergekit reads no per-model setting of it
        models.append(model)
        own.append(settings)
    if base is not None and spec.mergekit_base == "input" and base not in models:
        models.append(base)  # mergekit merges a base_model it was not given among the models too
        own.append({})
    out: dict[str, Any] = {"models": models, "model_params": own}
    if spec.mergekit_base == "input":
        out["base"] = None
        if base is not None:
            out["donor"] = base
    else:
        out["base"] = base
    if spec.name == "slerp":  # ours interpolates from the first model (t = 0), mergekit's from the base
        if base is None:
            raise InvalidArgument("mergekit's slerp needs base_model (t = 0)", path)
        out.update(models=[base, *models], model_params=[{}, *own], base=None)
    _require(spec, out["model_params"], [params], out["models"], path)
    for name in set.intersection(*(set(o) for o in out["model_params"])) - {"weight"} - set(params):
        declared = spec.param(name)
        if declared is None or not declared.per_model:
            continue  # not a per-model parameter: the config refuses it where it was given
        values = [o[name] for o in out["model_params"]]
        if all(not varies(v) and v == values[0] for v in values):  # one value for all: the same as a global one
            params[name] = values[0]
            for o in out["model_params"]:
                del o[name]
    weights = [o.get("weight") for o in out["model_params"]]
    if all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights) and weights:
        out["weights"] = [float(w) for w in weights]
        for o in out["model_params"]:
            del o["weight"]
    if not any(out["model_params"]):
        del out["model_params"]
    return out


def _slices(
    spec: MergeMethod, entries: Any, base: str | None, params: dict[str, Any], path: str | Path
) -> dict[str, Any]:
    if not isinstance(entries, list) or not entries:
        raise InvalidArgument("slices must be a non-empty list", path)
    slices = []
    for i, entry in enumerate(entries):
        where = f"slices[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("sources"), list) or not entry["sources"]:
            raise InvalidArgument(f"{where} needs sources: a list of {{model, layer_range}}", path)
        extra = set(entry) - {"sources", "parameters", "base_model", "residual_weight"}
        if extra:
            raise InvalidArgument(
                f"{where} has keys mergekit does not read: {', '.join(sorted(map(str, extra)))}", path
            )
        if entry.get("residual_weight") is not None:
            raise InvalidArgument(f"{where}.residual_weight: mergekit reads it but never uses it; remove it", path)
        sources = []
        for j, src in enumerate(entry["sources"]):
            at = f"{where}.sources[{j}]"
            if not isinstance(src, dict) or "model" not in src or "layer_range" not in src:
                raise InvalidArgument(f"{at} needs model and layer_range", path)
            extra = set(src) - {"model", "layer_range", "parameters"}
            if extra:
                raise InvalidArgument(
                    f"{at} has keys mergekit does not read: {', '.join(sorted(map(str, extra)))}", path
                )
            span = src["layer_range"]
            if not (
                isinstance(span, list)
                and len(span) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) for x in span)
            ):
                raise InvalidArgument(f"{at}.layer_range must be [start, end], two integers, got {shown(span)}", path)
            settings = _translated(
                spec, _parameters(src.get("parameters"), f"{at}.parameters", path), f"{at}.parameters", path
            )
            sources.append(SliceSource(_model(src["model"], f"{at}.model", path), (span[0], span[1]), settings))
        slice_base = _model(entry["base_model"], f"{where}.base_model", path) if entry.get("base_model") else None
        own = _translated(
            spec, _parameters(entry.get("parameters"), f"{where}.parameters", path), f"{where}.parameters", path
        )
        slices.append(Slice(tuple(sources), own, slice_base))
    for s in slices:
        chosen = s.base or base
        non_base = [src for src in s.sources if not (spec.mergekit_base != "input" and src.model == chosen)]
        _require(spec, [src.params for src in non_base], [s.params, params], [src.model for src in non_base], path)
    referenced = list(dict.fromkeys(src.model for s in slices for src in s.sources if src.model != base))
    out: dict[str, Any] = {"slices": slices, "models": referenced or [base], "base": base}
    if spec.mergekit_base == "input":
        out["base"] = None
        if base is not None:
            out["donor"] = base
    return out


def _require(
    spec: MergeMethod, own: list[dict[str, Any]], shared: list[dict[str, Any]], models: list[str], path: str | Path
) -> None:
    """The parameters mergekit requires (no default) given: for every model (or once for all), a
    shared one with the method's parameters."""
    for name, default in spec.mergekit_defaults.items():
        if default is not MERGEKIT_REQUIRED or any(name in s for s in shared):
            continue
        declared = spec.param(name)
        if name != "weight" and declared is not None and not declared.per_model:
            given = any(name in o for o in own)
            where = "is one value for all models: give it with the method's parameters" if given else "has no default"
            raise InvalidArgument(f"mergekit's {spec.mergekit}: {name} {where}", path)
        for settings, model in zip(own, models):
            if name not in settings:
                raise InvalidArgument(f"mergekit's {spec.mergekit} needs {name} for {model} (it has no default)", path)


def _defaults(spec: MergeMethod, options: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """mergekit's defaults for what the recipe does not give, where ours differ (spelt out, so the
    record says what was used)."""
    given = set(params)
    for settings in options.get("model_params") or []:
        given |= set(settings)
    for s in options.get("slices") or []:
        given |= set(s.params) | {k for src in s.sources for k in src.params}
    out = {}
    for name, default in spec.mergekit_defaults.items():
        declared = spec.param(name)
        if default is MERGEKIT_REQUIRED or name in given or declared is None:
            continue
        if default != declared.default:
            out[name] = default
    return out


class _NotExpressible(Exception):
    """A setting mergekit cannot state."""


def _spelt(name: str, setting: Any) -> Any:
    """A setting as mergekit spells it (rescale: "l1"/"none" as true/false)."""
    if name == "rescale":
        if setting == "inverse" or not isinstance(setting, str):
            raise _NotExpressible(name)
        return setting == "l1"
    return dumped(setting)


def recipe_of(config: MergeConfig, out_dtype: str) -> dict[str, Any] | None:
    """The mergekit recipe that makes what `config` makes (`mergekit_config.yml`: mergekit reads it,
    so a user can go back), or None where mergekit cannot say it (a method or option mergekit does
    not have, a parameter mergekit fixes at another value). Every parameter is spelt out, so
    mergekit's defaults never decide; the maths runs in float32 (`dtype`), the output is `out_dtype`."""
    spec = config.spec
    if (
        not spec.mergekit
        or config.modifiers
        or config.coeff == "nan"
        or config.as_adapter
        or config.auto_lambda
        or spec.calibration
        or (spec.mergekit_base == "input" and config.base is not None)
    ):
        return None
    known = spec.mergekit_defaults
    values = config.resolved.as_dict()
    try:
        shared: dict[str, Any] = {}
        for p in config.declared():
            given = config.params.get(p.name, values[p.field])
            if p.name not in known:
                if given != p.default:
                    return None  # mergekit fixes this at what our default is
                continue
            if given is not None:
                shared[p.name] = _spelt(p.name, given)
        if "weight" in config.params:
            shared["weight"] = dumped(config.params["weight"])
        out: dict[str, Any] = {"merge_method": spec.mergekit}
        if config.slices is not None:
            out["slices"] = [
                {
                    "sources": [
                        {
                            "model": src.model,
                            "layer_range": list(src.layers),
                            **({"parameters": {k: _spelt(k, v) for k, v in src.params.items()}} if src.params else {}),
                        }
                        for src in s.sources
                    ],
                    **({"base_model": s.base} if s.base else {}),
                    **({"parameters": {k: _spelt(k, v) for k, v in s.params.items()}} if s.params else {}),
                }
                for s in config.slices
            ]
            if config.base is not None:
                out["base_model"] = config.base
        else:
            models = list(config.models)
            own = [dict(m) for m in config.model_params] if config.model_params else [{} for _ in models]
            if config.weights is not None:
                for settings, w in zip(own, config.weights):
                    settings["weight"] = w
            elif known.get("weight") is MERGEKIT_REQUIRED and "weight" not in config.params:
                for settings in own:
                    settings.setdefault("weight", 1.0)
            if spec.name == "slerp":  # ours runs from the first model; mergekit from base_model
                out["base_model"], models, own = models[0], models[1:], own[1:]
            elif config.base is not None:
                out["base_model"] = config.base
            out["models"] = [
                {"model": m, **({"parameters": {k: _spelt(k, v) for k, v in o.items()}} if o else {})}
                for m, o in zip(models, own)
            ]
    except _NotExpressible:
        return None
    if shared:
        out["parameters"] = shared
    if config.vocabulary is not None:
        out["tokenizer"] = _tokenizer_written(config.vocabulary)
    if config.chat_template is not None:
        out["chat_template"] = config.chat_template
    out["dtype"] = "float32"
    out["out_dtype"] = out_dtype
    return out


def _tokenizer_written(v: Vocabulary) -> dict[str, Any]:
    tokens: dict[str, Any] = {}
    for token, row in v.tokens.items():
        if row.model is None:
            source: Any = {"kind": "zero"}
        elif row.token is not None or row.token_id is not None:
            which = {"token": row.token} if row.token is not None else {"token_id": row.token_id}
            source = {"kind": "model_token", "model": row.model, **which}
        else:
            source = row.model
        tokens[token] = {"source": source, **({"force": True} if row.force else {})}
    out: dict[str, Any] = {"source": v.source}
    if tokens:
        out["tokens"] = tokens
    if v.pad_to_multiple_of:
        out["pad_to_multiple_of"] = v.pad_to_multiple_of
    return out


def recipe_yaml(recipe: dict[str, Any]) -> str:
    """A recipe as YAML, lists of numbers on one line (as mergekit writes them)."""
    return str(yaml.dump(recipe, Dumper=_RecipeDumper, sort_keys=False, allow_unicode=True))


class _RecipeDumper(yaml.SafeDumper):  # type: ignore[misc]  # PyYAML is untyped
    def represent_list(self, data: list[Any]) -> yaml.SequenceNode:
        flow = all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in data)
        return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_RecipeDumper.add_representer(list, _RecipeDumper.represent_list)
