"""The values each option may take, declared once beside the option and checked where it enters.

An options dataclass declares its fields with `option(default, domain, "--flag")` and calls
`check_fields(self)` in `__post_init__`: the CLI builds these dataclasses, so the command line
and the Python API refuse the same values with the same one-line message.
"""

from __future__ import annotations

import difflib
import math
import numbers
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from weightlab.errors import InvalidArgument, shown

MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class Domain:
    """Integers or reals within bounds (always finite), one of some choices, or a regex."""

    kind: str  # "int", "real", "bool", "choice", "regex"
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()
    optional: bool = False  # None allowed (the option was not given)

    def describe(self) -> str:
        if self.kind == "bool":
            return "true or false"
        if self.kind == "choice":
            return "one of " + ", ".join(self.choices)
        if self.kind == "regex":
            return "a regular expression"
        noun = "an integer" if self.kind == "int" else "a finite number"
        if self.low is not None and self.high is not None:
            return (
                f"{noun} in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
            )
        if self.low is not None:
            return f"{noun} {'>' if self.low_open else '≥'} {self.low:g}"
        if self.high is not None:
            return f"{noun} {'<' if self.high_open else '≤'} {self.high:g}"
        return noun

    def contains(self, value: Any) -> bool:
        if value is None:
            return self.optional
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "choice":
            return isinstance(value, str) and value in self.choices
        if self.kind == "regex":
            if not isinstance(value, str):
                return False
            try:
                re.compile(value)
            except (re.error, RecursionError, OverflowError):
                return False
            return True
        if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy's numbers too
            return False
        if self.kind == "int" and not isinstance(value, numbers.Integral):
            return False
        number = int(value) if isinstance(value, numbers.Integral) else float(value)  # ints compared exactly
        if isinstance(number, float) and not math.isfinite(number):
            return False
        if self.low is not None and (number < self.low or (self.low_open and number == self.low)):
            return False
        return self.high is None or not (number > self.high or (self.high_open and number == self.high))

    def check(self, flag: str, value: Any) -> None:
        if not self.contains(value):
            shown_value = shown(value) if isinstance(value, str) else _shown_number(value)
            raise InvalidArgument(f"{flag} {shown_value}: must be {self.describe()}{self.suggestion(value)}")

    def suggestion(self, value: Any) -> str:
        """`; did you mean X?` for a mistyped choice close to one of them."""
        if self.kind != "choice" or not isinstance(value, str):
            return ""
        close = difflib.get_close_matches(value.lower(), self.choices, n=1, cutoff=0.6)
        return f"; did you mean {close[0]}?" if close else ""


def _shown_number(value: Any) -> str:
    """A float as the user most likely typed it: 0 rather than 0.0, where nothing is lost."""
    if isinstance(value, float) and math.isfinite(value) and float(f"{value:g}") == value:
        return f"{value:g}"
    return (
        shown(int(value))
        if isinstance(value, numbers.Integral)
        else str(value)
        if isinstance(value, numbers.Real)
        else shown(value)
    )


def Int(low: int | None = None, high: int | None = None, optional: bool = False) -> Domain:
    return Domain("int", low, high, optional=optional)


def Real(
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    optional: bool = False,
) -> Domain:
    return Domain("real", low, high, low_open, high_open, optional=optional)


def Bool() -> Domain:
    return Domain("bool")


def Choice(*choices: str, optional: bool = False) -> Domain:
    return Domain("choice", choices=choices, optional=optional)


REGEX = Domain("regex", optional=True)
SEED = Int(0, MAX_SEED)


def option(default: Any, domain: Domain | None, flag: str, *aliases: str, help: str = "", kw_only: bool = False) -> Any:
    """A field of an options dataclass, declared once for the Python API and the command line:
    its values are checked against `domain` (None: any value of the field's type), `flag` names
    it in messages and on the command line (`aliases` too, e.g. `--top-k`; a boolean's flag may be
    `--traps/--no-traps`), and `help` is its line in `--help`."""
    metadata: dict[str, Any] = {"flag": flag.split("/")[0], "flags": (flag, *aliases), "help": help}
    if domain is not None:
        metadata["domain"] = domain
    return field(default=default, metadata=metadata, kw_only=kw_only)


def check_fields(obj: Any) -> None:
    """Check every field of a dataclass declared with `option` against its domain."""
    for f in fields(obj):
        if "domain" in f.metadata:
            f.metadata["domain"].check(f.metadata["flag"], getattr(obj, f.name))


def domains_of(cls: Any) -> dict[str, tuple[str, Domain]]:
    """{field: (flag, domain)} of an options dataclass: for docs and generated tests."""
    return {f.name: (f.metadata["flag"], f.metadata["domain"]) for f in fields(cls) if "domain" in f.metadata}


def compile_filter(pattern: str | None, flag: str) -> re.Pattern[str] | None:
    if not pattern:
        return None
    try:
        return re.compile(pattern)
    except re.error as e:
        raise InvalidArgument(f"{flag} {pattern!r} is not a valid regular expression ({e})") from None


def typed(value: Any, kind: str, where: str, path: str | Path) -> Any:
    """`value` if it is of `kind` (str, number, int, mapping, list, bool), else a one-line error
    naming `where` (a key of a recipe read from `path`: mergekit's, ours, mergekit-moe's)."""
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
