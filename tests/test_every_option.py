"""No option is silently ignored: for every command and every option it declares, a run that gives
the option either produces different outputs from the same run without it, or is refused (exit 2).

Options that choose *how* the work runs (device, threads, cache, --force) must instead leave
every byte as it was; options that name an output must write it. An option this file does not
classify fails `test_every_option_is_classified`, so a new option cannot slip past unchecked.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
import typer.main
import yaml
from safetensors.torch import load_file

from weightlab.cli.app import app
from weightlab.cli.commands import run

# Options that say how the work runs: the outputs must not change. --ray has its own equality
# tests against the local run (tests/test_ray.py), which start a cluster.
HOW = {"--device": "cpu", "--threads": "1", "--cache-dir": "cache", "--no-cache": None, "--cache-size": "1GB"}
# Options that name an output: it must appear.
WRITES = {
    "--json": "x.json",
    "--csv": "x.csv",
    "--plots": "plots",
    "--report": "x.html",
    "--save": "directions",
    "--residual-out": "residual2",
    "--markdown": "x.md",
}
SKIPPED = {"--ray": "tests/test_ray.py runs every command on a started cluster", "--help": "click's own"}

# Options that change what is computed: a value other than the baseline's, per command where it matters.
WHAT = {
    "--include": "q_proj",
    "--exclude": "q_proj",
    "--top-k": "3",
    "--intruder-k": "3",
    "--epsilon": "0.9",
    "--keep": "3",
    "--values-only": None,
    "--rows": "0",
    "--dtype": "float64",
    "--side": "right",
    "--svd": "randomized",
    "--seed": "7",
    "--density": "0.3",
    "--traps": None,
    "--min-evals": "4",
    "--min-elements": "100",
    "--sample-size": "100",
    "--top": "2",
    "--filter": "q_proj",
    "--title": "another title",
    "--ray-timeout": "5",
    "--lambda": "0.5",
    "--targets": "v_proj",
    "--rank-budget": "6",
    "--rank-allocation": "entropy",
    "--no-residual": None,
    "--as-plain-lora": "{adapter}",
    "--lora": "{adapter}",
    "--initial": "{adapter}",
    "--tsd": None,
    "--from": "{ft}",
    "--method": "milora",
    "--rank": "2",
    "--alpha": "8",
    "--energy": "0.5",
    "--weights": "0.3,0.7",
    "--coeff": "nan",
    "--nan-norm-of": "task-vectors",
    "--nan-granularity": "model",
    "--nan-power": "2",
    "--nan-normalize": "count",
    "--param": "lam=0.5",
    "--svc": None,
    "--lines": None,
    "--gamma": "0.1",
    "--t": "0.3",
    "--config": "{config}",
    "--donor": "{donor}",
    "--shard-size": "20KB",
    "--as-adapter": None,
    "--max-rank": "2",
    "--match-experts": None,  # refused for the baseline's dense models; tests/test_expert_matching.py runs it
    "--near-copy": "0.3",
    "--by": "prune",
    "--experts": "3",
    "--calibration": "texts.txt",  # refused for the baseline's ties; test_merge_data_aware runs it
    "--tokenizer": "{base}",
    "--dry-run": None,  # no model written: the outputs differ
    "--base": "{base}",
    "--out": "elsewhere",
    "--force": None,
}
PER_COMMAND = {
    ("merge", "--method"): "task-arithmetic",
    ("merge", "--dtype"): "bfloat16",
    ("merge", "--seed"): "7",
    ("mitigate-intruders", "--lambda"): "0.5",
    ("init-lora", "--method"): "milora",
    ("init-lora", "--svd"): "randomized",
    ("experts", "--base"): "{moe_base}",
    ("slim-experts", "--experts"): "3",
    ("build-moe", "--tokenizer"): "{moe_tokenizer}",
}

BASELINES = {
    "inspect": ["inspect", "{base}", "--json", "r.json"],
    "spectrum": ["spectrum", "{base}", "{ft}", "--json", "r.json"],
    "angles": ["angles", "{ft}", "{ft2}", "--base", "{base}", "--json", "r.json"],
    "compare": ["compare", "{ft}", "{ft2}", "--base", "{base}", "--json", "r.json"],
    "esd": ["esd", "{ft}", "--json", "r.json"],
    "quant-error": ["quant-error", "{ft}", "{ft2}", "--json", "r.json"],
    "experts": ["experts", "{moe}", "--json", "r.json"],
    "slim-experts": ["slim-experts", "{moe}", "--experts", "2", "-o", "out", "--json", "r.json"],
    "build-moe": ["build-moe", "{moe_recipe}", "-o", "out", "--json", "r.json"],
    "gaussian": ["gaussian", "{ft}", "--json", "r.json"],
    "tsd": ["tsd", "{base}", "{ft}", "--json", "r.json"],
    "merge": ["merge", "--method", "ties", "--base", "{base}", "{ft}", "{ft2}", "-o", "out", "--json", "r.json"],
    "mitigate-intruders": ["mitigate-intruders", "{base}", "{ft}", "-o", "out", "--json", "r.json"],
    "init-lora": "init-lora {base} -r 4 --targets q_proj -o out --residual-out res --json r.json".split(),
    "extract-lora": ["extract-lora", "{base}", "{ft}", "-r", "4", "-o", "out", "--json", "r.json"],
    "report": ["report", "{result}", "-o", "r.html", "--markdown", "r.md"],
}
NOT_HERE = {"demo": "trains three fine-tunes (tests/test_demo.py runs it)"}


def _commands() -> dict:
    return typer.main.get_command(app).commands


def _options(command) -> list[str]:
    """The long flag of each option of a command."""
    return [max(p.opts, key=len) for p in command.params if p.param_type_name == "option"]


def _opposite(command, flag: str) -> str:
    """For an on/off pair (--traps/--no-traps), the one that is not the default; else `flag`."""
    param = next(p for p in command.params if flag in p.opts)
    return param.secondary_opts[0] if param.secondary_opts and param.default else flag


def test_every_option_is_classified():
    unclassified = {
        (name, flag)
        for name, command in _commands().items()
        if name not in NOT_HERE
        for flag in _options(command)
        if flag not in {**HOW, **WRITES, **WHAT, **SKIPPED}
    }
    assert not unclassified, f"say what these options do (HOW, WRITES or WHAT): {sorted(unclassified)}"
    assert set(_commands()) == set(BASELINES) | set(NOT_HERE)


_VOLATILE = re.compile(r"\d+(\.\d+)?\s?s\b|in \d+(\.\d+)? ?(seconds|s)")


def _without_seconds(value):
    if isinstance(value, dict):
        return {k: _without_seconds(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [_without_seconds(v) for v in value]
    return value


def _match(a, b, rounding: bool = False) -> bool:
    """Equal outputs; with `rounding`, equal up to float32 rounding (how the work runs, threads or
    device, may reorder BLAS sums: the last digits of ill-conditioned figures move)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_match(a[k], b[k], rounding) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_match(x, y, rounding) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        return torch.allclose(a.double(), b.double(), 1e-3, 1e-5) if rounding else torch.equal(a, b)
    if rounding and isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-5)
    if rounding and isinstance(a, str) and isinstance(b, str):  # the terminal shows 3 significant digits
        return _NUMBER.sub("#", a) == _NUMBER.sub("#", b)
    return type(a) is type(b) and a == b


_NUMBER = re.compile(r"-?\d+\.\d+(e[-+]?\d+)?")


def _fingerprint(folder: Path, stdout: str) -> dict:
    """Every file under `folder` by its bytes (JSON without timings; HTML and PNG by name only: they
    embed times and renderer details), and the terminal output without timings."""
    out = {"stdout": _VOLATILE.sub("", stdout)}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and "cache" not in p.parts):
        key = str(path.relative_to(folder))
        if path.suffix == ".json":
            out[key] = _without_seconds(json.loads(path.read_text()))
        elif path.suffix in (".html", ".png"):
            out[key] = "present"
        elif path.suffix == ".safetensors":
            out[key] = load_file(path)
        else:
            out[key] = path.read_bytes()
    return out


@pytest.fixture(scope="module")
def inputs(zoo, tmp_path_factory):
    from weightlab import synthetic

    root = tmp_path_factory.mktemp("inputs")
    ft2 = synthetic.save(synthetic.finetune(synthetic.tiny_model("llama", seed=0), steps=5, seed=2), root / "ft2")
    donor = root / "donor"
    shutil.copytree(zoo["llama"], donor)
    (donor / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')
    config = root / "merge.yml"
    config.write_text("method: ties\nlambda: 0.5\n")  # the command line gives the rest
    adapter = root / "adapter"
    assert run(["extract-lora", str(zoo["llama"]), str(zoo["llama_ft"]), "-r", "2", "-o", str(adapter)]) == 0
    result = root / "result.json"
    assert run(["inspect", str(zoo["llama"]), "--json", str(result)]) == 0
    from test_docs import moe_base

    moe_base(root / "moe-base", root / "moe")
    fixtures = Path(__file__).resolve().parent / "fixtures" / "moe"
    recipe = yaml.safe_load((fixtures / "mixtral-hidden.yml").read_text())
    recipe["gate_mode"] = "random"  # --seed changes it; --tokenizer does not apply
    recipe["base_model"] = str(fixtures / recipe["base_model"])
    for expert in recipe["experts"]:
        expert["source_model"] = str(fixtures / expert["source_model"])
    (root / "moe.yml").write_text(yaml.safe_dump(recipe))
    return {
        "moe_recipe": root / "moe.yml",
        "moe_tokenizer": fixtures / "llama-base",
        "moe": root / "moe",
        "moe_base": root / "moe-base",
        "base": zoo["llama"],
        "ft": zoo["llama_ft"],
        "ft2": ft2,
        "donor": donor,
        "config": config,
        "adapter": adapter,
        "result": result,
    }


def _run(args: list[str], inputs: dict, folder: Path, capsys, monkeypatch) -> tuple[int, dict]:
    folder.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(folder)
    code = run([a.format(**inputs) for a in args])
    return code, _fingerprint(folder, capsys.readouterr().out)


def _cases():
    for name, baseline in BASELINES.items():
        yield pytest.param(name, baseline, id=name)


@pytest.mark.slow
@pytest.mark.parametrize("name, baseline", _cases())
def test_each_option_changes_the_output_or_is_refused(name, baseline, inputs, tmp_path, capsys, monkeypatch):
    code, reference = _run(baseline, inputs, tmp_path / "baseline", capsys, monkeypatch)
    assert code == 0, f"the baseline of {name} fails"
    failures = []
    for i, flag in enumerate(_options(_commands()[name])):
        if flag in SKIPPED:
            continue
        value = PER_COMMAND.get((name, flag), {**HOW, **WRITES, **WHAT}[flag])
        given = [_opposite(_commands()[name], flag)] + ([] if value is None else [value])
        args = [a for a in baseline]
        if flag in args:  # the baseline gives it: take it out, the variant is the run without it
            at = args.index(flag)
            takes_value = at + 1 < len(args) and not args[at + 1].startswith("-")
            del args[at : at + 1 + takes_value]
            given = []
        folder = tmp_path / f"{i}"
        if flag == "--force":  # over the baseline's own outputs
            shutil.copytree(tmp_path / "baseline", folder)
        code, seen = _run(args + given, inputs, folder, capsys, monkeypatch)
        if flag in HOW or flag == "--force":
            if code not in (0, 2) or (code == 0 and not _match(seen, reference, rounding=True)):
                failures.append(f"{flag} {value or ''}: exit {code}, or it changed the outputs of a run")
        elif flag in WRITES and flag not in baseline:
            if code != 0 or len(seen) <= len(reference):
                failures.append(f"{flag} {value}: exit {code}, or it wrote nothing")
        elif code == 0 and _match(seen, reference):
            failures.append(f"{' '.join(given) or 'without ' + flag}: exit 0 and the same outputs (silently ignored)")
        elif code not in (0, 2):
            failures.append(f"{' '.join(given)}: exit {code}")
    assert not failures, f"{name}:\n" + "\n".join(failures)
