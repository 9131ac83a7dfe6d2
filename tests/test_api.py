"""The Python API (`import weightlab as wl`) is the command line without the parsing: for every
command, the function on models held in memory writes the JSON the command writes on their saved
checkpoints, a PEFT model in memory is its saved adapter, plain state dicts of numpy arrays work,
and bad input raises the command's one-line error."""

from __future__ import annotations

import copy
import inspect
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel

import weightlab as wl
from weightlab import synthetic
from weightlab.cli.commands import run
from weightlab.io import open_checkpoint

MEMORY = " (in memory)"


@pytest.fixture(scope="module")
def bank(zoo, tmp_path_factory) -> dict[str, Path]:
    """A base and two real fine-tunes of it, saved."""
    root = tmp_path_factory.mktemp("bank")
    return {
        "base": zoo["llama"],
        "a": zoo["llama_ft"],
        "b": synthetic.save(synthetic.finetune(synthetic.tiny_model("llama", seed=0), steps=5, seed=7), root / "b"),
    }


@pytest.fixture(scope="module")
def loaded(bank) -> dict[str, torch.nn.Module]:
    """The same models, loaded by transformers: in memory, named by where they came from."""
    return {key: AutoModel.from_pretrained(path) for key, path in bank.items()}


def _record(path: Path, *folders: Path) -> dict:
    """A JSON output with models held in memory named as their saved folders, and the output folders of
    the two runs alike."""
    text = path.read_text().replace(MEMORY, "")
    for folder in folders:
        text = text.replace(str(folder), "OUT")
    record = json.loads(text)
    record.pop("seconds", None)  # how long it took
    return record


def _cli(tmp: Path, *args: object) -> Path:
    tmp.mkdir(exist_ok=True)
    record = tmp / f"{args[0]}.json"
    assert run([str(a) for a in args] + ["--json", str(record)]) == 0
    return record


CASES = {  # command: (its arguments, the API call on the models in memory)
    "spectrum": (
        ("spectrum", "{base}", "{a}", "{b}"),
        lambda m, **o: wl.spectrum(m["base"], [m["a"], m["b"]], **o),
    ),
    "esd": (("esd", "{a}", "--base", "{base}"), lambda m, **o: wl.esd(m["a"], base=m["base"], **o)),
    "compare": (
        ("compare", "{a}", "{b}", "--base", "{base}"),
        lambda m, **o: wl.compare([m["a"], m["b"]], m["base"], **o),
    ),
    "angles": (
        ("angles", "{a}", "{b}", "--base", "{base}", "-k", "4"),
        lambda m, **o: wl.angles(m["a"], m["b"], m["base"], top_k=4, **o),
    ),
    "gaussian": (("gaussian", "{a}", "--base", "{base}"), lambda m, **o: wl.gaussian(m["a"], base=m["base"], **o)),
    "tsd": (("tsd", "{base}", "{a}", "--top", "3"), lambda m, **o: wl.tsd(m["base"], m["a"], top=3, **o)),
}


@pytest.mark.parametrize("command", sorted(CASES))
def test_each_analysis_on_models_in_memory_writes_the_commands_json(command, bank, loaded, tmp_path):
    args, call = CASES[command]
    on_disk = _cli(tmp_path / "cli", *(a.format(**bank) for a in args))
    result = call(loaded, json=tmp_path / "api.json", device="cpu")
    assert _record(tmp_path / "api.json") == _record(on_disk)
    assert result.to_dict()["schema"] == json.loads(on_disk.read_text())["schema"]


def test_inspect_in_memory_lists_what_the_saved_file_holds(bank, loaded, tmp_path):
    on_disk = _record(_cli(tmp_path / "cli", "inspect", bank["a"]))
    wl.inspect(loaded["a"], json=tmp_path / "api.json")
    in_memory = _record(tmp_path / "api.json")
    assert (on_disk.pop("kind"), in_memory.pop("kind")) == ("safetensors", "memory")
    assert in_memory == on_disk


OPERATIONS = {  # command: (its arguments, the API call, the output's files compared)
    "merge": (
        ("merge", "--method", "ties", "--base", "{base}", "{a}", "{b}", "--density", "0.3", "-o", "{out}/m"),
        lambda m, out, **o: wl.merge(m["base"], [m["a"], m["b"]], method="ties", density=0.3, out=out / "m", **o),
        "m",
    ),
    "extract-lora": (
        ("extract-lora", "{base}", "{a}", "-r", "2", "-o", "{out}/e"),
        lambda m, out, **o: wl.extract_lora(m["base"], m["a"], rank=2, out=out / "e", **o),
        "e/adapter_model.safetensors",
    ),
    "init-lora": (
        ("init-lora", "{base}", "--method", "pissa", "-r", "2", "-o", "{out}/i", "--residual-out", "{out}/res"),
        lambda m, out, **o: wl.init_lora(
            m["base"], method="pissa", rank=2, out=out / "i", residual_out=out / "res", **o
        ),
        "res",
    ),
    "mitigate-intruders": (
        ("mitigate-intruders", "{base}", "{a}", "--epsilon", "0.9", "-o", "{out}/x"),
        lambda m, out, **o: wl.mitigate_intruders(m["base"], m["a"], epsilon=0.9, out=out / "x", **o),
        "x",
    ),
}  # fmt: skip


@pytest.mark.parametrize("command", sorted(OPERATIONS))
def test_each_operation_on_models_in_memory_writes_what_the_command_writes(command, bank, loaded, tmp_path):
    args, call, output = OPERATIONS[command]
    cli, api = tmp_path / "cli", tmp_path / "api"
    on_disk = _cli(cli, *(a.format(out=cli, **bank) for a in args))
    api.mkdir()
    call(loaded, api, json=api / "r.json")
    assert _record(api / "r.json", api) == _record(on_disk, cli)
    made, expected = open_checkpoint(api / output), open_checkpoint(cli / output)
    assert sorted(made.names()) == sorted(expected.names())
    assert all(torch.equal(made.get(n), expected.get(n)) for n in expected.names())


def test_operations_without_out_return_the_model_in_memory(bank, loaded, tmp_path):
    """No folder: a merge is a state dict (or loaded into `into`), an adapter a NewAdapter PEFT takes, a
    residual and a mitigated fine-tune state dicts; each equals what the command writes, and no input moved."""
    before = {k: {n: t.clone() for n, t in m.state_dict().items()} for k, m in loaded.items()}
    cli = tmp_path / "cli"
    for args, _, _ in OPERATIONS.values():
        _cli(cli, *(a.format(out=cli, **bank) for a in args))
    merged = wl.merge(loaded["base"], [loaded["a"], loaded["b"]], method="ties", density=0.3)
    assert merged.report.config.method == "ties" and "StateDict(" in repr(merged)
    _same(merged, cli / "m")
    into = wl.merge(
        loaded["base"], [loaded["a"], loaded["b"]], method="ties", density=0.3, into=copy.deepcopy(loaded["base"])
    )
    _same(into.state_dict(), cli / "m")
    adapter = wl.extract_lora(loaded["base"], loaded["a"], rank=2)
    assert adapter.report.to_dict()["schema"] == "weightlab.lora-extract/1" and "NewAdapter(" in repr(adapter)
    _same(adapter.state_dict(), cli / "e", file="adapter_model.safetensors")
    from peft import PeftModel

    in_memory = adapter.to_peft(copy.deepcopy(loaded["base"])).merge_and_unload().state_dict()
    from_folder = PeftModel.from_pretrained(copy.deepcopy(loaded["base"]), cli / "e").merge_and_unload().state_dict()
    assert sorted(in_memory) == sorted(from_folder)
    assert all(torch.equal(in_memory[n], from_folder[n]) for n in from_folder)
    assert not torch.equal(
        in_memory["layers.0.self_attn.q_proj.weight"], before["base"]["layers.0.self_attn.q_proj.weight"]
    )
    init = wl.init_lora(loaded["base"], method="pissa", rank=2)
    _same(init.residual, cli / "res")
    mitigated = wl.mitigate_intruders(loaded["base"], loaded["a"], epsilon=0.9)
    _same(mitigated, cli / "x")
    for key, model in loaded.items():
        assert all(torch.equal(t, before[key][n]) for n, t in model.state_dict().items()), key


def _same(state: dict, folder: Path, file: str = "") -> None:
    saved = open_checkpoint(folder / file if file else folder)
    assert sorted(state) == sorted(saved.names())
    assert all(torch.equal(state[n], saved.get(n)) for n in saved.names())


def test_a_peft_model_in_memory_is_its_saved_adapter(zoo, adapters, tmp_path):
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(zoo["llama"]), adapters["llama"])
    base = AutoModel.from_pretrained(zoo["llama"])
    on_disk = _record(_cli(tmp_path / "cli", "spectrum", zoo["llama"], adapters["llama"]))
    wl.spectrum(base, peft_model, json=tmp_path / "api.json")
    in_memory = json.loads((tmp_path / "api.json").read_text().replace("+lora" + MEMORY, "").replace(MEMORY, ""))
    on_disk["finetuned"] = in_memory["finetuned"] = None  # the adapter's folder, or the base it wraps
    for m in [*on_disk["matrices"], *in_memory["matrices"]]:
        m.pop("finetuned", None)
    assert in_memory == on_disk
    # its base, read through the PEFT layers it wraps, is the base
    wrapped = open_checkpoint(peft_model.get_base_model())
    plain = open_checkpoint(zoo["llama"])
    assert sorted(wrapped.names()) == sorted(plain.names())
    assert all(torch.equal(wrapped.get(n), plain.get(n)) for n in plain.names())


def test_state_dicts_of_numpy_arrays_and_prefixed_names_work(loaded, tmp_path):
    base = {k: v.numpy() for k, v in loaded["base"].state_dict().items()}
    ft = {"module." + k: v.numpy().copy() for k, v in loaded["a"].state_dict().items()}  # as DDP saves them
    from_arrays = wl.gaussian(ft, base=base).to_dict()
    from_modules = wl.gaussian(loaded["a"], base=loaded["base"]).to_dict()
    for d in (from_arrays, from_modules):
        d.pop("checkpoint"), d.pop("base")
    assert from_arrays == from_modules


def test_tied_weights_are_read_once(tmp_path):
    gpt2 = synthetic.tiny_model("gpt2", causal_lm=True)
    synthetic.save(gpt2, tmp_path / "gpt2")
    memory, saved = open_checkpoint(gpt2), open_checkpoint(tmp_path / "gpt2")
    assert list(memory.names()) == list(saved.names())  # the saved file's order, too
    assert memory.tied == {"lm_head.weight": "transformer.wte.weight"}


def _error_line(args: list[str], capsys) -> str:
    assert run(args) == 2
    return capsys.readouterr().err.strip().removeprefix("error: ")


def test_bad_input_raises_the_commands_error(bank, loaded, capsys, tmp_path):
    m = loaded
    cases = [
        (["spectrum", bank["base"], bank["a"], "-k", "0"], lambda: wl.spectrum(m["base"], [m["a"]], top_k=0)),
        (["angles", bank["a"], bank["b"], "--seed", "3"], lambda: wl.angles(m["a"], m["b"], seed=3)),
        (["merge", "--method", "tie", "--base", bank["base"], bank["a"], bank["b"], "-o", tmp_path / "x"],
         lambda: wl.merge(m["base"], [m["a"], m["b"]], method="tie")),
        (["spectrum", tmp_path / "nowhere", bank["a"]], lambda: wl.spectrum(tmp_path / "nowhere", [m["a"]])),
        (["esd", bank["a"], "--no-traps", "--seed", "2"], lambda: wl.esd(m["a"], traps=False, seed=2)),
        (["merge", "--method", "dare-ties", "--base", bank["base"], bank["a"], bank["b"], "--param", "densty=0.2",
          "-o", tmp_path / "y"], lambda: wl.merge(m["base"], [m["a"], m["b"]], method="dare-ties", densty=0.2)),
    ]  # fmt: skip
    for args, call in cases:
        with pytest.raises(wl.WeightlabError) as raised:
            call()
        assert str(raised.value) == _error_line([str(a) for a in args], capsys), args
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    with pytest.raises(wl.WeightlabError, match="has no option 'topk'; did you mean top_k"):
        wl.spectrum(m["base"], [m["a"]], topk=3)
    with pytest.raises(wl.WeightlabError, match="NaN or Inf"):
        wl.gaussian({"w": torch.full((64, 64), float("nan"))})
    with pytest.raises(wl.WeightlabError, match="not a tensor or an array"):
        wl.inspect({"w": [1.0, 2.0]})
    with pytest.raises(wl.WeightlabError, match="a model in memory cannot be"):
        wl.spectrum(m["base"], [m["a"]], ray="127.0.0.1:1")


def test_every_command_option_is_a_keyword_of_its_function():
    """The API mirrors the command line: each option of each command is a keyword of its function
    (the long flag in Python's spelling; -o is out), with the same default."""
    import typer

    import weightlab.cli.commands  # noqa: F401  (registers the commands)
    from weightlab.cli.app import app

    functions = {
        "inspect": wl.inspect, "spectrum": wl.spectrum, "esd": wl.esd, "compare": wl.compare, "angles": wl.angles,
        "gaussian": wl.gaussian, "tsd": wl.tsd, "merge": wl.merge, "init-lora": wl.init_lora,
        "extract-lora": wl.extract_lora, "mitigate-intruders": wl.mitigate_intruders,
    }  # fmt: skip
    cli_only = {"rows", "param", "gamma", "epsilon", "t"}  # display, and --param NAME=VALUE (keywords in the API)
    spelled = {"json_out": "json", "csv_out": "csv", "name_filter": "name_filter", "lam": "lam"}
    missing = []
    for name, command in typer.main.get_command(app).commands.items():
        if name not in functions:
            continue
        keywords = inspect.signature(functions[name]).parameters
        for param in command.params:
            if param.name in cli_only and not (name == "mitigate-intruders" and param.name == "epsilon"):
                continue
            long = max((o for o in param.opts if o.startswith("--")), key=len, default=None)
            keyword = spelled.get(param.name) or (long.lstrip("-").replace("-", "_") if long else param.name)
            keyword = {"lambda": "lam", "out": "out", "from": "source"}.get(keyword, keyword)
            if keyword not in keywords:
                missing.append(f"{name} {long or param.name} -> {keyword}")
    assert not missing


def test_results_show_in_a_notebook(loaded, tmp_path):
    result = wl.spectrum(loaded["base"], [loaded["a"]], plots=tmp_path / "plots")
    frame = result.to_pandas()
    assert len(frame) == len(result.rows()) > 0 and list(frame.columns) == list(result.rows()[0])
    figures = result.plot()
    assert len(figures) == len(list((tmp_path / "plots").glob("*.png"))) > 0
    assert all(f.axes for f in figures) and "<img" in figures._repr_html_()
    page = result._repr_html_()
    checker = _Balanced()
    checker.feed(page)
    assert checker.open == [] and page.count("<img") == len(figures) and "<table>" in page


class _Balanced(HTMLParser):
    VOID = frozenset({"img", "br", "meta", "hr", "input"})

    def __init__(self) -> None:
        super().__init__()
        self.open: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag not in self.VOID:
            self.open.append(tag)

    def handle_endtag(self, tag):
        assert self.open and self.open[-1] == tag, (self.open, tag)
        self.open.pop()


def test_to_pandas_without_pandas_says_how_to_get_it(loaded, monkeypatch):
    result = wl.inspect(loaded["base"])
    monkeypatch.setitem(__import__("sys").modules, "pandas", None)
    with pytest.raises(wl.WeightlabError, match="pip install pandas"):
        result.to_pandas()


def test_the_docstrings_say_what_each_option_does():
    for function in (wl.spectrum, wl.merge, wl.mitigate_intruders, wl.init_lora):
        doc = function.__doc__
        assert "Parameters\n" in doc and "Returns\n" in doc and "References\n" in doc and "{options}" not in doc
        for keyword in inspect.signature(function).parameters:
            if keyword not in ("run", "progress", "method_params"):
                assert f"{keyword} :" in doc or f", {keyword}" in doc or f"{keyword}, " in doc, (function, keyword)


def test_models_in_memory_are_named_as_given(loaded):
    result = wl.compare({"math": loaded["a"], "code": loaded["b"]}, loaded["base"])
    assert result.to_dict()["finetuned"] == ["math (in memory)", "code (in memory)"]
    merged = wl.merge(loaded["base"], {"math": loaded["a"], "code": loaded["b"]}, method="task-arithmetic", lam=0.5)
    assert merged.report.config.models == ["math (in memory)", "code (in memory)"]


def test_peft_models_in_memory_merge_as_an_adapter(zoo, adapters, tmp_path):
    """`as_adapter` on PeftModels in memory is the command on their saved folders; a module of another
    model given as `into` is refused in one line."""
    from peft import PeftModel

    folders = [adapters["llama"], adapters["llama"]]
    assert run(["merge", "--method", "task-arithmetic", "--as-adapter", "--base", str(zoo["llama"]),
                *map(str, folders), "-o", str(tmp_path / "m")]) == 0  # fmt: skip
    models = [PeftModel.from_pretrained(AutoModel.from_pretrained(zoo["llama"]), f) for f in folders]
    merged = wl.merge(AutoModel.from_pretrained(zoo["llama"]), models, method="task-arithmetic", as_adapter=True)
    assert merged.base_model is None  # an adapter of a model in memory names no folder as its base
    _same(merged.state_dict(), tmp_path / "m", file="adapter_model.safetensors")
    with pytest.raises(wl.WeightlabError, match="into="):
        wl.merge(zoo["llama"], [zoo["llama_ft"]], method="task-arithmetic", into=synthetic.tiny_model("bert"))


def test_models_that_cannot_be_read_are_refused_in_one_line(loaded):
    with torch.device("meta"):
        unloaded = torch.nn.Linear(8, 8)
    sparse = {"w": torch.eye(8).to_sparse()}
    for bad, message in (
        (unloaded, "meta device"),
        (sparse, "sparse_coo tensor"),
        ({}, "holds no tensors"),
        ({"w": np.array(["a", "b"])}, "not supported"),
        ({1: torch.eye(2)}, "not a tensor name"),
        (3, r"checkpoint= must be a string or a path or a torch\.nn\.Module or a mapping .*, got int 3"),
        ({"w": np.ones((2, 2), dtype=np.longdouble)}, "has no torch dtype"),
        ({"w": torch.ones(2, 2, dtype=torch.complex64)}, "'w': is complex"),
        ({"w": np.ones((2, 2), dtype=np.complex128)}, "'w': array of dtype complex128 is not supported"),
    ):
        with pytest.raises(wl.WeightlabError, match=message):
            wl.inspect(bad)
    fts = (m for m in (loaded["a"], loaded["b"]))  # a generator of fine-tunes is several models
    assert len(wl.compare(fts, loaded["base"]).to_dict()["finetuned"]) == 2


def test_progress_reaches_a_bar_or_the_callers_own(loaded):
    from contextlib import contextmanager

    seen = []

    @contextmanager
    def mine(description, unit):
        yield (lambda total: seen.append((description, unit, total))), seen.append

    result = wl.esd(loaded["a"], traps=False, progress=mine)
    assert seen[0] == ("esd", "matrices", len(result.matrices)) and sum(seen[1:]) == len(result.matrices)
    assert wl.esd(loaded["a"], traps=False, progress=True).to_dict() == result.to_dict()


@pytest.mark.parametrize("as_adapter", [False, True])
def test_a_peft_model_in_memory_is_refused_as_the_base(as_adapter):
    """A PEFT model is an adapter: as the base of a merge it is refused by name (it crashed with an
    AttributeError, as --as-adapter's base and as a dense merge's)."""
    from peft import LoraConfig, get_peft_model

    from weightlab.errors import InvalidArgument

    torch.manual_seed(0)
    config = LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    peft = get_peft_model(synthetic.tiny_model("llama", seed=0), config)
    with pytest.raises(InvalidArgument, match="the base must be the model it adapts"):
        wl.merge(base=peft, models=[peft, copy.deepcopy(peft)], method="task-arithmetic", as_adapter=as_adapter)
