"""Every `weightlab ...` example in docs/ runs, on small real checkpoints named as in the docs."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from conftest import GGUF_FIXTURES

from weightlab import synthetic

DOCS = Path(__file__).resolve().parent.parent / "docs"
SKIP = ("weightlab demo",)  # the tour has its own test (test_demo.py)


def examples(page: Path) -> tuple[dict[str, str], list[list[str]]]:
    """Files a page defines (```yaml NAME blocks) and its runnable commands, as argument lists."""
    text = page.read_text()
    files = {name: body for name, body in re.findall(r"```\w+ (\S+)\n(.*?)```", text, flags=re.S)}
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            code = line.split(" #")[0]
            if (
                code.startswith("weightlab ")
                and not code.startswith(SKIP)
                and not re.search(r"\[|\.\.\.|\b[A-Z]{2,}\b", code)
            ):
                commands.append(shlex.split(line, comments=True))
    return files, commands


@pytest.fixture(scope="module")
def workspace(zoo, adapters, tmp_path_factory):
    """base/, ft/, ft_a/, ft_b/, ft_c/, model/, model.safetensors, adapter/, adapter_a/, adapter_b/,
    warmup-adapter/, tokenizer/ and results/: real tiny Llama checkpoints, PEFT adapters, a tokenizer;
    llama/ with llama-q4.gguf and llama-q8.gguf (llama.cpp's files of it), gptq/ (AutoGPTQ's);
    dense-base/ and dense-ft1/…dense-ft3/ (causal LMs with a BOS tokenizer, build-moe's fixtures)."""
    root = tmp_path_factory.mktemp("docs")
    links = {
        "base": zoo["llama"],
        "model": zoo["llama"],
        "ft": zoo["llama_ft"],
        "ft_a": zoo["llama_ft"],
        "ft_c": zoo["llama_ft"],
        "adapter": adapters["llama"],
        "adapter_a": adapters["llama"],
        "adapter_b": adapters["llama_rslora_pattern"],
        "warmup-adapter": adapters["llama"],
        "model.safetensors": zoo["llama"] / "model.safetensors",
        "llama": GGUF_FIXTURES / "llama",  # llama.cpp's own files of a tiny Llama, and its original
        "llama-q4.gguf": GGUF_FIXTURES / "llama.Q4_K_M.gguf",
        "llama-q8.gguf": GGUF_FIXTURES / "llama.Q8_0.gguf",
        "gptq": GGUF_FIXTURES.parent / "quantized" / "gptq-8bit",
        **{f"dense-{m}": GGUF_FIXTURES.parent / "moe" / f"llama-{m}" for m in ("base", "ft1", "ft2", "ft3")},
    }
    for name, target in links.items():
        (root / name).symlink_to(target)
    synthetic.save(synthetic.finetune(synthetic.tiny_model("llama", seed=0), steps=5, seed=9), root / "ft_b")
    synthetic.tiny_tokenizer(root / "tokenizer")  # for --calibration (unknown words read as [UNK])
    moe_base(root / "moe-base", root / "moe-ft")
    return root


def moe_base(base: Path, finetuned: Path) -> None:
    """moe-base/: a tiny Qwen3-MoE (transformers' config class) whose experts 1 and 3 of layer 0 are
    near copies (an upcycled model's start); moe-ft/: it with expert 2 of layer 1 and its router
    row moved."""
    import torch
    from test_experts import _moe

    model = _moe("qwen3_moe")
    experts = model.model.layers[0].mlp.experts
    with torch.no_grad():
        experts.gate_up_proj[3] = experts.gate_up_proj[1] + 1e-3 * torch.randn_like(experts.gate_up_proj[1])
        experts.down_proj[3] = experts.down_proj[1]
        model.save_pretrained(base)
        model.model.layers[1].mlp.experts.down_proj[2] += 0.02 * torch.randn_like(experts.down_proj[2])
        model.model.layers[1].mlp.gate.weight[2] *= 1.2
        model.save_pretrained(finetuned)


def pages() -> list[Path]:
    return sorted(p for p in DOCS.glob("*.md") if examples(p)[1])


@pytest.mark.parametrize("page", pages(), ids=lambda p: p.name)
def test_docs_examples_run(page, workspace, run_cli, monkeypatch):
    files, commands = examples(page)
    monkeypatch.chdir(workspace)
    for name, body in files.items():
        (workspace / name).write_text(body)
    (workspace / "results").mkdir(exist_ok=True)
    for command in commands:
        args = command[1:]
        if args[0] == "report" and "results/" in args:
            run_cli("spectrum", "base/", "ft/", "--json", "results/spectrum.json", "--force")
        code, _, err = run_cli(*args, "--force")
        assert code == 0, f"{page.name}: {shlex.join(command)}\n{err}"


def test_python_api_page_runs(workspace, monkeypatch):
    """docs/python-api.md's Python blocks, in order, in one namespace, on the same checkpoints; every
    one uses the flat API (`import weightlab as wl`)."""
    blocks = re.findall(r"```python\n(.*?)```", (DOCS / "python-api.md").read_text(), flags=re.S)
    assert blocks and "import weightlab as wl" in blocks[0]
    assert all("wl." in block for block in blocks)
    monkeypatch.chdir(workspace)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "python-api.md", "exec"), namespace)
    assert (workspace / "merged" / "weightlab_merge.yml").is_file() and (workspace / "spectrum.html").is_file()
