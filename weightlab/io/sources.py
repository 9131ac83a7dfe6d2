"""Where a model comes from, without loading it (no numerical library is imported here, so the
command line can check its inputs at once): a path or Hub ID, or a model held in memory, and the
name results give it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ForwardRef, TypeAlias, Union

if TYPE_CHECKING:
    import torch

# Where a model is accepted: a path, a Hub ID (`org/name[@revision]`), or a model in memory (a
# module, a PEFT model, a mapping of names to tensors or arrays; `Named` to name it in results).
# A mapping's values are checked when it is read, each refused by its name (`io.memory`).
if TYPE_CHECKING:
    Source: TypeAlias = "str | Path | torch.nn.Module | Mapping[Any, Any] | Named"
else:  # resolvable from any module: `typecheck.hints_of` is given torch, Named is looked up here
    Source = Union[str, Path, ForwardRef("torch.nn.Module"), Mapping[Any, Any], ForwardRef("Named", module=__name__)]  # noqa: UP007
# One model or several: a list (or any iterable) of models, or a mapping of names to models.
Sources = Source | Iterable[Source] | Mapping[str, Source]


def is_in_memory(source: object) -> bool:
    """True for a model held in memory (a module or a mapping), False for a path or Hub ID."""
    return not isinstance(source, (str, Path))


def is_peft_model(source: object) -> bool:
    """A PEFT `PeftModel` (checked by its type's module, so peft need not be imported)."""
    return type(source).__module__.startswith("peft.") and hasattr(source, "peft_config")


@dataclass(frozen=True)
class Named:
    """A model in memory with the name results give it (`wl.spectrum(base, {"math": m1, "code": m2})`)."""

    name: str
    model: object


def label_of(source: object) -> str:
    """How an in-memory model is named in results and messages: its given name (`Named`), else
    where transformers loaded it from (`config.name_or_path`), else its class; then '(in memory)'."""
    if isinstance(source, Named):
        return f"{source.name} (in memory)"
    if isinstance(source, Mapping):
        return "state dict (in memory)"
    if is_peft_model(source):
        base = source.get_base_model()  # type: ignore[attr-defined]
        return f"{getattr(base.config, 'name_or_path', '') or type(base).__name__}+lora (in memory)"
    name = getattr(getattr(source, "config", None), "name_or_path", "") or type(source).__name__
    return f"{name} (in memory)"


def describe(source: object) -> str:
    """A model as a record names it: its path or Hub ID as given, or its in-memory label."""
    return label_of(source) if is_in_memory(source) else str(source)
