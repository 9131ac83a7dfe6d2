"""What every function of the Python API shares: how its keyword options become the checked
options dataclasses (declared once, in `weightlab.options`), the options of how it runs (`Run`:
device, threads, Ray, outputs, progress), and the one rule for options that do not apply.

The command line calls the same functions (`cli/`), handing them the dataclasses it parsed and
the names of the options the user typed, so both refuse the same input with the same line.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import typing
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from weightlab.compute.progress import Callbacks, Reporter
from weightlab.errors import InvalidArgument, shown
from weightlab.io.hub import require_input
from weightlab.io.outputs import OutputPlan, plan_outputs
from weightlab.options import RUN_OPTIONS, Checked
from weightlab.results import Result
from weightlab.typecheck import check, check_call, hints_of

if TYPE_CHECKING:
    from weightlab.compute.device import Compute

R = TypeVar("R")
P = TypeVar("P")


@contextmanager
def _silent(description: str, unit: str) -> Iterator[Callbacks]:
    yield (lambda total, nbytes=0: None), (lambda done, nbytes=0: None)


@contextmanager
def bar(description: str, unit: str) -> Iterator[Callbacks]:
    """Progress as a tqdm bar (a widget in a notebook that has ipywidgets, else text): `progress=True`."""
    from tqdm.auto import tqdm

    shown = tqdm(desc=description, unit=f" {unit}", leave=False)

    def start(total: int, nbytes: int = 0) -> None:
        shown.total = total
        shown.refresh()

    try:
        yield start, lambda done, nbytes=0: shown.update(done)
    finally:
        shown.close()


def counts_only(reporter: Callable[[str, str], AbstractContextManager[Any]]) -> Reporter:
    """A caller's progress, whose callbacks take counts alone (`progress=` in the public API),
    under the internal one, which passes bytes too."""

    @contextmanager
    def wrapped(description: str, unit: str) -> Iterator[Callbacks]:
        with reporter(description, unit) as (start, step):
            yield (lambda total, nbytes=0: start(total)), (lambda done, nbytes=0: step(done))

    return wrapped


@dataclass(frozen=True)
class Run:
    """How a function runs and what it writes besides its result (each field is the option of
    the same name in `options.RUN_OPTIONS`), the options the caller gave (`given`), and where
    progress goes (the command line's bar; nothing by default)."""

    device: str = "auto"
    dtype: str = "float32"
    threads: int | None = None
    ray: str | None = None
    ray_timeout: float | None = None
    json: str | Path | None = None
    csv: str | Path | None = None
    plots: str | Path | None = None
    report: str | Path | None = None
    force: bool = False
    given: frozenset[str] = frozenset()
    progress: Reporter = field(default=_silent, repr=False)

    def compute(self) -> Compute:
        from weightlab.compute.device import Compute

        return Compute.create(
            self.device, self.dtype, cluster=self.ray, cluster_timeout=self.ray_timeout, threads=self.threads
        )

    def outputs(self, inputs: Sequence[object], **more: Path | str | None) -> OutputPlan:
        """The plan of the outputs asked for (`json`, `csv`, `plots`, `report` and `more`),
        checked against the inputs before any work: inputs on disk must exist, none may be
        written over; a model in memory cannot go to Ray workers."""
        on_disk = [i for i in inputs if isinstance(i, (str, Path))]
        if self.ray is not None and len(on_disk) < len([i for i in inputs if i is not None]):
            raise InvalidArgument(
                "--ray reads every input by path on each node; a model in memory cannot be: "
                "save it, or run without --ray"
            )
        for given in on_disk:
            require_input(given)
        return plan_outputs(
            self.force, on_disk, json=self.json, csv=self.csv, plots=self.plots, report=self.report, **more
        )

    def refuse_unless(self, applies: bool, reason: str, *names: str, flags: dict[str, str] | None = None) -> None:
        """The one rule for options that only matter with another one: each of `names` the
        caller gave where it does not apply (`applies` false) is refused, `reason` saying why."""
        if not applies:
            for name in names:
                if name in self.given:
                    raise InvalidArgument(f"{(flags or {}).get(name) or flag_of(name)} {reason}")


def emit(plan: OutputPlan, result: Result, draw: Callable[[Path], list[Path]] | None = None) -> None:
    """Write any result's JSON, CSV, plots and report to the plan's outputs (committed together);
    `draw` replaces the plots `report.plots.draw` makes for the result's type."""
    from weightlab.report.export import to_csv, to_json

    if "--json" in plan:
        plan.write_text("--json", to_json(result.to_dict()))
    if "--csv" in plan:
        plan.write_text("--csv", to_csv(result.rows()))
    if "--plots" in plan:  # matplotlib loads only when something is drawn
        from weightlab.report.plots import draw as draw_plots

        folder = plan.path("--plots")
        folder.mkdir()
        (draw or (lambda d: draw_plots(result, d)))(folder)
    if "--report" in plan:
        from weightlab.report.document import write_report

        write_report([result], plan.path("--report"))


def with_record(product: P, result: Result) -> P:
    """A model made in memory (a `StateDict`, a `NewAdapter`) with the record of how it was made as `.report`."""
    product.report = result  # type: ignore[attr-defined]
    return product


# ---- keyword options -> checked dataclasses ------------------------------------------------------

_FLAGS: dict[str, str] = {}  # option name -> its long flag, for messages (filled as functions register)


def flag_of(name: str) -> str:
    """How the command line spells option `name` (its longest flag), for messages."""
    return _FLAGS.get(name) or "--" + name.replace("_", "-")


def _longest(flags: Sequence[str]) -> str:
    return max((f.split("/")[0] for f in flags if f.startswith("-")), key=len)


for _name, (_flags, _help) in RUN_OPTIONS.items():
    _FLAGS[_name] = _longest(_flags)


def _option_fields(cls: Any) -> list[dataclasses.Field[Any]]:
    return [f for f in dataclasses.fields(cls) if "flags" in f.metadata]


def keyword_of(f: dataclasses.Field[Any]) -> str:
    """An option's keyword in the API: its long flag in Python's spelling (`--top-k` is `top_k`,
    `--nan-power` `nan_power`; `--lambda`, a Python keyword, is `lam`)."""
    name = _longest(f.metadata["flags"]).lstrip("-").replace("-", "_")
    return "lam" if name == "lambda" else name


def _documented(name: str, annotation: Any, default: Any, flags: Sequence[str], help: str) -> str:
    kind = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    return f"{name} : {kind}, default {default!r}\n    {help} (command line: {', '.join(flags)})"


def _api_names() -> dict[str, Any]:
    """What the API's annotations name but import only for type checking."""
    import numpy as np
    import torch

    from weightlab.io.sources import Named

    return {"torch": torch, "np": np, "Named": Named}


def check_arguments(
    core: Callable[..., Any],
    signature: inspect.Signature,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    run: Sequence[str],
) -> None:
    """Every argument of a call checked where it enters (`typecheck`): its number and names against
    the public signature, then each value against its annotation, the core's own parameters and the
    run options alike (the options dataclasses check their fields when built)."""
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as e:
        raise InvalidArgument(f"{core.__name__}(): {e}") from None
    own = inspect.signature(core).parameters
    values: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        parameter = own.get(name)
        if parameter is not None and parameter.kind is inspect.Parameter.VAR_KEYWORD:
            element = hints_of(core, _api_names)[name]
            for key, item in value.items():
                check(f"{core.__name__}(): {key}=", item, element)
        elif name in own or name in run:
            values[name] = value
    check_call(core, core, {n: v for n, v in values.items() if n in own}, _api_names)
    check_call(core, Run, {n: v for n, v in values.items() if n in run})
    if "progress" in bound.arguments:
        chosen = bound.arguments["progress"]
        if not (chosen is None or isinstance(chosen, bool) or callable(chosen)):
            raise InvalidArgument(
                f"{core.__name__}(): progress= must be true or false or a callable, got {shown(chosen)}"
            )


def api_function(
    run: Sequence[str], flags: dict[str, str] | None = None
) -> Callable[[Callable[..., R]], Callable[..., R]]:
    """The public form of an API function `core(sources…, own options…, *, <name>: <Options
    dataclass>…, run: Run)`: every field of its options dataclasses and each of `run` (names in
    `options.RUN_OPTIONS`) becomes a keyword argument with the declared default, documented in
    its docstring ('{options}' marks where), checked when the dataclass is built; an unknown
    keyword is refused naming the closest one. `core` stays callable as `.core` (the command
    line calls it with the dataclasses it parsed). `flags` spells the core's own options as the
    command line does, for messages."""

    def wrap(core: Callable[..., R]) -> Callable[..., R]:
        signature = inspect.signature(core)

        def options_class(p: inspect.Parameter) -> type | None:
            cls = core.__globals__.get(p.annotation) if isinstance(p.annotation, str) else p.annotation
            return cls if isinstance(cls, type) and issubclass(cls, Checked) else None

        own = [p for n, p in signature.parameters.items() if n != "run" and options_class(p) is None]
        classes: dict[str, type] = {}
        for n, p in signature.parameters.items():
            cls = options_class(p)
            if cls is not None:
                classes[n] = cls
        _FLAGS.update({n: f for n, f in (flags or {}).items()})
        option_params, docs = [], []
        for cls in classes.values():
            for f in _option_fields(cls):
                _FLAGS.setdefault(f.name, _longest(f.metadata["flags"]))
                annotation = typing.get_type_hints(cls)[f.name]
                option_params.append(
                    inspect.Parameter(
                        keyword_of(f), inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=annotation
                    )
                )
                docs.append(_documented(keyword_of(f), annotation, f.default, f.metadata["flags"], f.metadata["help"]))
        run_fields = {f.name: f for f in dataclasses.fields(Run)}
        run_hints = typing.get_type_hints(Run)
        for name in run:
            option_params.append(
                inspect.Parameter(
                    name, inspect.Parameter.KEYWORD_ONLY, default=run_fields[name].default, annotation=run_hints[name]
                )
            )
            docs.append(_documented(name, run_hints[name], run_fields[name].default, *RUN_OPTIONS[name]))
        docs.append(
            "progress : bool or callable, default None\n    True shows a tqdm bar; a callable (description, unit) -> "
            "context manager of (on_start(total), on_progress(done)) gets the progress; None: none."
        )
        progress = inspect.Parameter(
            "progress", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Reporter | bool | None
        )
        var_keyword = [p for p in own if p.kind is inspect.Parameter.VAR_KEYWORD]
        plain = [p for p in own if p.kind is not inspect.Parameter.VAR_KEYWORD]
        parameters = plain + option_params + [progress] + var_keyword
        known = {p.name for p in parameters if p.kind is not inspect.Parameter.VAR_KEYWORD}

        public_signature = signature.replace(parameters=parameters)

        @functools.wraps(core)
        def public(*args: Any, **kwargs: Any) -> R:
            unknown = [k for k in kwargs if k not in known]
            if unknown and not var_keyword:
                close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
                hint = f"; did you mean {close[0]}?" if close else ""
                raise InvalidArgument(f"{core.__name__}() has no option {shown(unknown[0])}{hint}")
            check_arguments(core, public_signature, args, kwargs, run)
            fields = {keyword_of(f): f.name for cls in classes.values() for f in _option_fields(cls)}
            given = frozenset(fields.get(k, k) for k in kwargs)  # by field name, as the command line gives them
            built = {
                name: cls(**{f.name: kwargs.pop(keyword_of(f)) for f in _option_fields(cls) if keyword_of(f) in kwargs})
                for name, cls in classes.items()
            }
            chosen: Any = kwargs.pop("progress", None)
            settings: dict[str, Any] = {name: kwargs.pop(name) for name in run if name in kwargs}
            if chosen:
                settings["progress"] = bar if chosen is True else counts_only(chosen)
            runner = Run(**settings, given=given)
            return core(*args, **kwargs, **built, run=runner)

        public.__signature__ = public_signature  # type: ignore[attr-defined]
        public.__doc__ = (core.__doc__ or "").replace("{options}", "\n".join(docs).replace("\n", "\n    "))
        public.core = core  # type: ignore[attr-defined]
        return public

    return wrap
