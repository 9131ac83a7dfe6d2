"""The one interface every command's result has, and the registry the report dispatches on.

A result is a typed dataclass that subclasses `Result` and declares its schema (`SCHEMA =
"weightlab.NAME/VERSION"`). It serialises itself (`to_dict`, `rows` for CSV), says what a person
reads first (`tables`, `headline`, `lines`), and is rebuilt from its JSON by `from_dict` — so
`weightlab report` works from files and a new analysis needs no report code. Its plots are drawn
by `report.plots.draw`, which dispatches on the result's type.
"""

from __future__ import annotations

import importlib
import types
import typing
from dataclasses import MISSING, asdict, dataclass, fields, is_dataclass
from typing import Any, ClassVar

from weightlab.errors import InvalidArgument

_TYPES: dict[str, type[Result]] = {}


@dataclass
class Table:
    """A table for people: the terminal shows its first rows, the report all of them."""

    title: str
    columns: list[str]
    rows: list[list[Any]]
    caption: str = ""
    numeric_from: int = 1  # columns before this one are labels
    names: bool = False  # the first column holds tensor names, which the terminal may shorten (a layer column shows it)


class Result:
    """Base of every command's result (a dataclass). Subclasses set the class attributes and
    implement what applies; the defaults are empty."""

    SCHEMA: ClassVar[str]  # "weightlab.NAME/VERSION"; bump VERSION when a field changes meaning
    TITLE: ClassVar[str] = ""  # the report section's heading
    REFERENCE: ClassVar[str] = ""  # the papers behind it
    ORDER: ClassVar[int] = 50  # position of its section in a report (smaller first)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "SCHEMA" in cls.__dict__:
            _TYPES[cls.SCHEMA] = cls

    def to_dict(self) -> dict:
        return {"schema": self.SCHEMA, **asdict(self)}  # type: ignore[call-overload]

    def rows(self) -> list[dict]:
        """One flat row of scalars per tensor, for CSV."""
        return []

    def tables(self) -> list[Table]:
        """Tables for people, the main one first (rows sorted by what matters most)."""
        return []

    def lines(self) -> list[str]:
        """A few sentences the terminal prints after the tables."""
        return []

    def headline(self) -> list[tuple[str, str, Any]]:
        """(key, label, value): the few numbers a report shows first."""
        return []

    def title(self) -> str:
        return self.TITLE

    def note(self) -> str:
        return ""

    def problems_found(self) -> list[str]:
        return list(getattr(self, "problems", []))

    # ---- in a notebook ----------------------------------------------------------------------

    def to_pandas(self) -> Any:
        """One row per matrix (pair, tensor) with the CSV's columns (`rows()`), as a pandas DataFrame."""
        try:
            import pandas as pd
        except ImportError:
            raise InvalidArgument('to_pandas() needs pandas: pip install pandas (or "weightlab[notebook]")') from None
        return pd.DataFrame(self.rows())

    def plot(self) -> list[Any]:
        """The matplotlib figures `--plots` saves for this result (none for a kind without plots)."""
        return _presentation().figures(self)

    def _repr_html_(self) -> str:
        """The result's section of the HTML report (headline, plots, main table), for Jupyter."""
        return str(_presentation().result_html(self))

    @classmethod
    def from_dict(cls, payload: dict) -> Result:
        """The result again from its `to_dict()`, every field checked against its declared type."""
        return from_dict(cls, payload)


def _presentation() -> Any:
    """`report.notebook`, loaded when a notebook shows a result: presentation lives above this
    floor, and this is the one place the bottom floor reaches up to it (by name, on demand)."""
    return importlib.import_module("weightlab.report.notebook")


def registered(schema: object) -> type[Result] | None:
    """The result class registered for a schema string (a class registers when its module is
    imported: `report.catalog` imports them all when a report needs every kind)."""
    return _TYPES.get(schema) if isinstance(schema, str) else None


def registered_schemas() -> list[str]:
    return sorted(_TYPES)


# ---- rebuilding typed dataclasses from JSON ----------------------------------------------------


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """A dataclass instance (nested dataclasses and lists of them included) from its asdict(),
    with every field present and of its declared type; else InvalidArgument naming the field.
    Keys that are no field (derived values such as summaries) are ignored."""
    if not isinstance(data, dict):
        raise InvalidArgument(f"{where or 'the result'} is not an object")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in fields(cls):
        if not f.init:
            continue
        if f.name not in data:
            if f.default is MISSING and f.default_factory is MISSING:
                raise InvalidArgument(f"missing field {f.name!r}" + (f" in {where}" if where else ""))
            continue
        kwargs[f.name] = _convert(hints[f.name], data[f.name], f"{where}.{f.name}" if where else f.name)
    return cls(**kwargs)


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if is_dataclass(hint):
        return from_dict(hint, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise InvalidArgument(f"{where} is not a list")
        return [_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is dict:
        hint = dict
    if hint is float:
        if value is None:
            return float("nan")  # JSON has no NaN: our writer stores it as null
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint in (str, bool, dict):
        ok = isinstance(value, hint)
    else:
        ok = True
    if not ok:
        raise InvalidArgument(f"{where} should be {getattr(hint, '__name__', hint)}, got {type(value).__name__}")
    return value
