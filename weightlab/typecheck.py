"""Values checked against their type annotations where they enter (the Python API's arguments,
the options dataclasses' fields), so that a wrong type is one `InvalidArgument` naming what was
expected, never a TypeError from deep inside. An `Annotated[T, domain]` is checked against its
domain too (`domains.Domain`). Forward references are resolved when first checked, with names
the caller gives (torch, for the API): this module imports no numerical library.
"""

from __future__ import annotations

import collections.abc
import numbers
import os
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from weightlab.domains import Domain
from weightlab.errors import InvalidArgument, shown

_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "a path"}


_HINTS: dict[Any, dict[str, Any]] = {}


def hints_of(owner: Any, names: Callable[[], dict[str, Any]] | None = None) -> dict[str, Any]:
    """The type hints of a function or dataclass, Annotated kept, computed once; `names` gives the
    names its forward references need that its module imports only for type checking (torch)."""
    if owner not in _HINTS:
        target = owner
        if isinstance(
            owner, types.FunctionType
        ):  # its parameters only: a return type may be imported for checkers alone
            target = types.FunctionType(owner.__code__, owner.__globals__)
            target.__annotations__ = {k: v for k, v in owner.__annotations__.items() if k != "return"}
        _HINTS[owner] = typing.get_type_hints(target, localns=names() if names else None, include_extras=True)
    return _HINTS[owner]


def describe(hint: Any) -> str:
    """What a hint accepts, for a person."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        return describe(args[0])
    if hint is type(None) or hint is None:
        return "None"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(describe(a) for a in args))
    if hint in _NAMES:
        return _NAMES[hint]
    if origin in (collections.abc.Sequence, collections.abc.Iterable, list, tuple):
        return f"a list of {_each(args[0])}" if args else "a list"
    if origin in (collections.abc.Mapping, dict):
        return f"a mapping of {_each(args[0])} to {_each(args[1])}" if args and Any not in args else "a mapping"
    if origin is collections.abc.Callable:
        return "a callable"
    if isinstance(hint, type):
        home = "torch.nn" if hint.__module__.startswith("torch.nn") else hint.__module__.split(".")[0]
        return f"a {hint.__name__} model" if home == "weightlab" else f"a {home}.{hint.__name__}"
    return str(hint)


def _each(hint: Any) -> str:
    """`describe` of a container's items: "numbers", "(a string or a path)"."""
    plural = {int: "integers", float: "numbers", str: "strings", Path: "paths"}
    if hint in plural:
        return plural[hint]
    text = describe(hint)
    return f"({text})" if " or " in text else text


def conforms(value: Any, hint: Any) -> bool:
    """Whether `value` is of type `hint` (and within an Annotated domain). A sequence's and a
    mapping's items are checked; a one-pass iterator's are not (they are checked when used)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin is typing.Annotated:
        return conforms(value, args[0]) and all(
            d.contains(value) or (value is None and d.optional) for d in args[1:] if isinstance(d, Domain)
        )
    if hint is None or hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(conforms(value, a) for a in args)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if hint is Path:
        return isinstance(value, (str, os.PathLike))
    if origin in (collections.abc.Sequence, list, tuple):
        if isinstance(value, (str, bytes, collections.abc.Mapping)) or not _is_sequence(value):
            return False
        return not args or all(conforms(v, args[0]) for v in value)
    if origin is collections.abc.Iterable:
        if isinstance(value, (str, bytes, collections.abc.Mapping)) or not isinstance(value, collections.abc.Iterable):
            return False
        return not args or not _is_sequence(value) or all(conforms(v, args[0]) for v in value)
    if origin in (collections.abc.Mapping, dict):
        if not isinstance(value, collections.abc.Mapping):
            return False
        return not args or all(conforms(k, args[0]) and conforms(v, args[1]) for k, v in value.items())
    if origin is collections.abc.Callable or hint is collections.abc.Callable:
        return callable(value)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # a hint this checker does not model (a TypeVar): left to the code that uses it


def _is_sequence(value: Any) -> bool:
    return isinstance(value, (collections.abc.Sequence, collections.abc.Set)) or (
        type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 1
    )


def check(where: str, value: Any, hint: Any) -> None:
    """Refuse `value` unless it is of type `hint`: one line naming `where` and what it expects."""
    if conforms(value, hint):
        return
    domains = (
        [d for d in typing.get_args(hint)[1:] if isinstance(d, Domain)]
        if typing.get_origin(hint) is typing.Annotated
        else []
    )
    if domains and conforms(value, typing.get_args(hint)[0]):
        domains[0].check(where, value)
    got = type(value).__name__
    raise InvalidArgument(f"{where} must be {describe(hint)}, got {got} {shown(value)}")


def check_call(
    function: Callable[..., Any],
    owner: Any,
    arguments: dict[str, Any],
    names: Callable[[], dict[str, Any]] | None = None,
) -> None:
    """Check each of `arguments` (name -> value) against `owner`'s hint of that name (`hints_of`);
    `function` names the call in messages."""
    hints = hints_of(owner, names)
    for name, value in arguments.items():
        if name in hints:
            check(f"{function.__name__}(): {name}=", value, hints[name])
