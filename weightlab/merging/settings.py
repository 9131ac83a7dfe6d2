"""Parameter settings that vary over the model, as mergekit writes them, resolved per tensor.

A setting is a value (a number, true/false, a word), a gradient (a list of values: numbers are
interpolated over the layers, anything else picked), or a list of conditions `{filter, value}`:
the first whose filter the tensor's name contains (a condition without a filter, or with `*`,
matches every tensor) gives its value, itself a value or a gradient. `t` is the tensor's place in
the layers: layer j of a stack of L layers has t = j/(L − 1) (1 for a single layer), a tensor
outside the layers t = 0.

Precedence, first given wins: a model's own settings (for the parameters a method takes per
model), the slice's, the recipe's, the method's default (mergekit's `ConfigReader` and
`parameter_resolver`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from weightlab.errors import InvalidArgument, shown

Setting = Any  # a value, a list of values, or a tuple of Conditions


@dataclass(frozen=True)
class Condition:
    """One `{filter: …, value: …}` entry of a setting (filter None: every tensor)."""

    filter: str | None
    value: Any  # a value or a gradient


def is_value(x: Any) -> bool:
    return isinstance(x, (bool, int, float, str)) and not (isinstance(x, float) and x != x)


def parse(setting: Any, where: str) -> Setting:
    """A setting as written (YAML or Python) in checked form: values kept, gradients as lists of
    values, conditions as a tuple of `Condition`; anything else is refused naming `where`."""
    if is_value(setting):
        return setting
    if isinstance(setting, Mapping):
        return (_condition(setting, where),)
    if isinstance(setting, (list, tuple)) and setting:
        if all(is_value(v) for v in setting):
            return list(setting)
        if all(isinstance(v, Mapping) for v in setting):
            return tuple(_condition(v, f"{where}[{i}]") for i, v in enumerate(setting))
    raise InvalidArgument(
        f"{where} must be a value, a gradient (a list of values) or a list of {{filter, value}} "
        f"conditions, got {shown(setting)}"
    )


def _condition(entry: Mapping[str, Any], where: str) -> Condition:
    unknown = set(entry) - {"filter", "value"}
    if unknown or "value" not in entry:
        raise InvalidArgument(f"{where} must be {{filter: text, value: …}}, got {shown(dict(entry))}")
    found = entry.get("filter")
    if found is not None and not isinstance(found, str):
        raise InvalidArgument(f"{where}.filter must be text, got {shown(found)}")
    value = entry["value"]
    if not (is_value(value) or (isinstance(value, list) and value and all(is_value(v) for v in value))):
        raise InvalidArgument(f"{where}.value must be a value or a gradient, got {shown(value)}")
    return Condition(found, value)


def values_of(setting: Setting) -> list[Any]:
    """Every value a setting can give (to check each against the parameter's domain)."""
    if isinstance(setting, tuple):
        return [v for c in setting for v in values_of(c.value)]
    if isinstance(setting, list):
        return list(setting)
    return [setting]


def varies(setting: Setting) -> bool:
    """Whether a setting can give different tensors different values."""
    return not is_value(setting)


def evaluate(setting: Setting, tensor: str, t: float) -> Any:
    """The setting's value for `tensor` at layer position `t`, or None when no condition matches
    (mergekit's `evaluate_setting`)."""
    if isinstance(setting, tuple):
        for condition in setting:
            if condition.filter in (None, "*") or (tensor and condition.filter in tensor):
                return evaluate(condition.value, tensor, t)
        return None
    if isinstance(setting, list):
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting)
        if not numeric:
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    return setting


def first_given(scopes: Iterable[Mapping[str, Setting] | None], name: str, tensor: str, t: float) -> Any:
    """The first value a scope gives for `name` (None when none does)."""
    for scope in scopes:
        if scope and name in scope:
            value = evaluate(scope[name], tensor, t)
            if value is not None:
                return value
    return None


def position(layer: int | None, layers: int) -> float:
    """t of a tensor: j/(L − 1) for layer j of L (1 when L = 1); 0 outside the layers."""
    if layer is None:
        return 0.0
    return layer / (layers - 1) if layers > 1 else 1.0


def dumped(setting: Setting) -> Any:
    """A setting as YAML and JSON write it (conditions as `{filter, value}` mappings): what `parse` reads."""
    if isinstance(setting, tuple):
        return [{**({"filter": c.filter} if c.filter is not None else {}), "value": c.value} for c in setting]
    return list(setting) if isinstance(setting, list) else setting
