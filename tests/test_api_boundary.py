"""The Python API checks every argument where it enters: every public function × every parameter,
given values of the wrong type, raises one `WeightlabError` saying what it expected (never a bare
TypeError, AttributeError or ValueError from deep inside), before any work and with nothing written.
The checks come from the declarations (annotations and option domains), so a new keyword cannot
skip them: this walk covers whatever the signatures hold."""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import weightlab as wl
from weightlab import synthetic
from weightlab.api.frame import _api_names
from weightlab.typecheck import conforms, hints_of

FUNCTIONS = [name for name in wl.__all__ if name != "WeightlabError"]


class Opaque:
    """A value no parameter takes."""

    def __repr__(self) -> str:
        return "Opaque()"


WRONG = [Opaque(), 1 + 2j, b"bytes", {"k": Opaque()}, [Opaque()], "text", 7, 2.5, True, float("nan"), ("a", 1)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("boundary")
    base = synthetic.tiny_model("llama", seed=0)
    ft = synthetic.finetune(synthetic.tiny_model("llama", seed=0), steps=2, seed=1)
    from test_experts import _moe

    return {
        "base": base,
        "ft": ft,
        "ft_path": synthetic.save(ft, root / "ft"),
        "moe": _moe("qwen3_moe"),
        "root": root,
        "moe_recipe": _moe_recipe(),
    }


def _valid(name: str, m) -> tuple[list, dict]:
    """The smallest valid call of each function (the walk replaces one argument at a time)."""
    base, ft = m["base"], m["ft"]
    return {
        "inspect": ([base], {}),
        "spectrum": ([base, [ft]], {}),
        "esd": ([ft], {"base": base}),
        "quant_error": ([base, ft], {}),
        "experts": ([m["moe"]], {}),
        "slim_experts": ([m["moe"]], {"experts": 2, "out": m["root"] / "slim"}),
        "build_moe": ([m["moe_recipe"]], {"out": m["root"] / "built"}),
        "compare": ([[ft, ft]], {"base": base}),
        "angles": ([ft, ft], {"base": base}),
        "gaussian": ([ft], {"base": base}),
        "tsd": ([base, ft], {}),
        "merge": ([base, [ft, ft]], {"method": "task-arithmetic"}),
        "init_lora": ([base], {"no_residual": True}),
        "extract_lora": ([base, ft], {"rank": 2}),
        "mitigate_intruders": ([base, ft], {}),
    }[name]


def _parameters(name: str):
    return [
        p
        for p in inspect.signature(getattr(wl, name)).parameters.values()
        if p.kind is not inspect.Parameter.VAR_KEYWORD
    ]


def _hint(fn, parameter):
    """The declared type of a parameter: the function's own annotation, or its options field's."""
    core = fn.core
    own = hints_of(core, _api_names)
    if parameter.name in own:
        return own[parameter.name]
    return parameter.annotation if not isinstance(parameter.annotation, str) else None


CASES = [(name, p.name) for name in FUNCTIONS for p in _parameters(name)]


@pytest.mark.parametrize("function, keyword", CASES, ids=[f"{f}-{k}" for f, k in CASES])
def test_every_keyword_refuses_values_of_the_wrong_type_in_one_weightlab_error(
    function, keyword, models, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    fn = getattr(wl, function)
    args, kwargs = _valid(function, models)
    parameters = {p.name: p for p in _parameters(function)}
    position = list(parameters).index(keyword)
    hint = _hint(fn, parameters[keyword])
    tried = 0
    for value in WRONG:
        if hint is not None and conforms(value, hint):
            continue  # of the right type: domains are walked in test_option_domains
        call_args, call_kwargs = list(args), dict(kwargs)
        if position < len(call_args) and parameters[keyword].kind is not inspect.Parameter.KEYWORD_ONLY:
            call_args[position] = value
        else:
            call_kwargs[keyword] = value
        try:
            fn(*call_args, **call_kwargs)
        except wl.WeightlabError as e:
            message = str(e)
            assert "\n" not in message and len(message) < 600, message
        except Exception as e:  # the point: nothing but a WeightlabError
            pytest.fail(f"{function}({keyword}={value!r}) raised {type(e).__name__}: {e}")
        else:
            if type(value) is Opaque:
                pytest.fail(f"{function}({keyword}=Opaque()) was accepted")
            continue
        tried += 1
    assert tried >= 1  # an Opaque value at least
    assert os.listdir(tmp_path) == [], "a refused call wrote something"


def test_the_examples_of_the_issue_are_one_line_errors(models):
    base, ft = models["base"], models["ft"]
    cases = [
        (lambda: wl.merge(base, [ft, ft], method="task-arithmetic", into="model"), "into= must be a torch.nn.Module"),
        (
            lambda: wl.merge(base, [ft, ft], method="task-arithmetic", into=base, as_adapter=True),
            "into= loads a merged",
        ),
        (
            lambda: wl.merge(base, [ft, ft], method="task-arithmetic", weights=["half", "half"]),
            "weights= must be a list of numbers",
        ),
        (lambda: wl.merge(None, [ft, ft], method="regmean", calibration=123), "calibration= must be"),
        (lambda: wl.inspect({"w": np.ones((2, 2), dtype=np.longdouble)}), "has no torch dtype"),
        (lambda: wl.merge(base, [{"w": torch.ones(2, dtype=torch.complex64)}], method="average"), "is complex"),
        (lambda: wl.spectrum(base, [ft], threads="2"), "threads= must be an integer"),
        (lambda: wl.spectrum(base, [ft], progress=3), "progress= must be"),
        (lambda: wl.merge(base, [ft], method="ties", gamma="x"), "gamma= must be a number"),
        (lambda: wl.spectrum(base, ft, ft), "too many positional arguments"),
    ]
    for call, message in cases:
        with pytest.raises(wl.WeightlabError, match=message):
            call()


def test_right_types_still_work(models, tmp_path):
    """The checks accept what the functions take: paths as str or Path, numpy weights, generators,
    mappings of names to models, numpy numbers."""
    base, ft = models["base"], models["ft"]
    assert wl.merge(base, (m for m in [ft, ft]), method="task-arithmetic", weights=np.array([0.5, 0.5]))
    assert wl.spectrum(base, {"a": ft, "b": models["ft_path"]}).to_dict()
    assert wl.extract_lora(base, ft, rank=np.int64(2))
    assert wl.merge(base, [ft], method="task-arithmetic", params={"lambda": "auto"}).report.auto_lambda


def _moe_recipe() -> dict:
    """mergekit-moe's fixture recipe with random router rows, its models by absolute path."""
    import yaml

    fixtures = Path(__file__).resolve().parent / "fixtures" / "moe"
    recipe = yaml.safe_load((fixtures / "mixtral-hidden.yml").read_text())
    recipe["gate_mode"] = "random"
    recipe["base_model"] = str(fixtures / recipe["base_model"])
    for expert in recipe["experts"]:
        expert["source_model"] = str(fixtures / expert["source_model"])
    return recipe
