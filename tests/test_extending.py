"""docs/extending.md's worked analysis and worked operation, as printed there, are working
commands: loaded as the modules the page names, they run on a real checkpoint, and their JSON
makes a report."""

import json
import re
import subprocess
import sys
from pathlib import Path

import torch

from weightlab.io import open_checkpoint

PAGE = Path(__file__).resolve().parents[1] / "docs" / "extending.md"

RUN = r"""
import json, sys, types
from pathlib import Path

def load(name, source):
    module = types.ModuleType(name)
    module.__file__ = name.replace(".", "/") + ".py"
    sys.modules[name] = module
    exec(compile(source, module.__file__, "exec"), module.__dict__)

blocks = json.loads(Path(sys.argv[1]).read_text())
import weightlab.options
exec(compile(blocks.pop("weightlab/options.py"), "weightlab/options.py", "exec"), weightlab.options.__dict__)
library = [path for path in blocks if not path.startswith("weightlab/cli/")]
for path in library + [path for path in blocks if path not in library]:
    if path.startswith("weightlab/cli/"):
        import weightlab.cli.commands as commands  # the real app, with every built-in command
    load(path.removesuffix(".py").replace("/", "."), blocks[path])
codes = [commands.run(args) for args in json.loads(sys.argv[2])]
exec(sys.argv[3])  # the API function, in this process
print(json.dumps(codes))
"""


def _blocks(stem: str) -> dict[str, str]:
    found = re.findall(rf"```python\n# (weightlab/\S*(?:{stem}|options)\.py)\n(.*?)```", PAGE.read_text(), flags=re.S)
    blocks = {path: text for path, text in found if path != "weightlab/options.py"}
    blocks["weightlab/options.py"] = "\n".join(
        text for path, text in found if path == "weightlab/options.py" and stem.title() in text
    )
    return blocks


def _run(blocks: dict[str, str], runs: list[list[str]], tmp_path: Path, api: str = "") -> list[int]:
    (tmp_path / "blocks.json").write_text(json.dumps(blocks))
    done = subprocess.run(
        [sys.executable, "-c", RUN, tmp_path / "blocks.json", json.dumps([[str(a) for a in r] for r in runs]), api],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_worked_analysis_runs_as_printed(zoo, tmp_path):
    blocks = _blocks("norms")
    assert set(blocks) == {
        "weightlab/options.py",
        "weightlab/analysis/norms.py",
        "weightlab/api/norms.py",
        "weightlab/cli/norms.py",
    }
    codes = _run(
        blocks,
        [
            ["norms", zoo["llama"], "--top", "2", "--json", "n.json", "--csv", "n.csv", "--report", "n.html"],
            ["report", "n.json", "-o", "again.html"],
        ],
        tmp_path,
        api=f"from transformers import AutoModel\nfrom weightlab.api.norms import norms\n"
        f"norms(AutoModel.from_pretrained({str(zoo['llama'])!r}), top=2, json='api.json')",
    )
    assert codes == [0, 0]
    in_memory = json.loads((tmp_path / "api.json").read_text())
    assert in_memory.pop("base") == f"{zoo['llama']} (in memory)"
    on_disk = json.loads((tmp_path / "n.json").read_text())
    assert on_disk.pop("base") == str(zoo["llama"]) and in_memory == on_disk  # the same numbers, to the byte
    result = json.loads((tmp_path / "n.json").read_text())
    assert result["schema"] == "weightlab.norms/1" and result["matrices"]
    ckpt = open_checkpoint(zoo["llama"])
    for m in result["matrices"]:
        expected = torch.linalg.svdvals(ckpt.get(m["name"], dtype=torch.float32))[:2].tolist()
        assert len(m["top"]) == 2 and all(abs(g - e) < 1e-4 * expected[0] for g, e in zip(m["top"], expected))
    assert "Largest singular values" in (tmp_path / "again.html").read_text()
    assert (tmp_path / "n.csv").read_text().startswith("name,layer,top")


def test_the_worked_operation_runs_as_printed(zoo, tmp_path):
    """clip-delta writes a checkpoint transformers loads, each matrix's update capped by the formula,
    every other tensor the fine-tune's; its options change the output or are refused."""
    blocks = _blocks("clip")
    assert set(blocks) == {
        "weightlab/options.py",
        "weightlab/surgery/clip.py",
        "weightlab/api/clip.py",
        "weightlab/cli/clip.py",
    }
    base, ft = zoo["llama"], zoo["llama_ft"]
    cap = 0.01
    codes = _run(
        blocks,
        [
            ["clip-delta", base, ft, "--max-norm", cap, "-o", "out", "--json", "c.json", "--report", "c.html"],
            ["clip-delta", base, ft, "--max-norm", 10 * cap, "-o", "loose"],
            ["clip-delta", base, ft, "--max-norm", cap, "--include", "q_proj", "-o", "some"],
            ["clip-delta", base, ft, "--max-norm", "0", "-o", "refused"],
            ["clip-delta", base, ft, "--ray-timeout", "3", "-o", "refused"],
            ["report", "c.json", "-o", "again.html"],
        ],
        tmp_path,
        api="import torch\nfrom safetensors.torch import save_file\nfrom weightlab.api.clip import clip_delta\n"
        "from weightlab.io import open_checkpoint as o\n"
        f"b, f = o({str(base)!r}), o({str(ft)!r})\n"
        "mem = clip_delta({n: b.get(n) for n in b.names()}, {n: f.get(n) for n in f.names()}, max_norm=0.01)\n"
        "assert mem.report.matrices\n"
        "save_file(dict(mem), 'memory.safetensors')",
    )
    assert codes == [0, 0, 0, 2, 2, 0]
    assert not (tmp_path / "refused").exists()
    b, f = open_checkpoint(base), open_checkpoint(ft)
    out, loose, some = (open_checkpoint(tmp_path / name) for name in ("out", "loose", "some"))
    result = json.loads((tmp_path / "c.json").read_text())
    matrices = {m["name"]: m for m in result["matrices"]}
    assert result["schema"] == "weightlab.clip-delta/1" and len(matrices) > 4
    assert set(out.names()) == set(f.names())
    for name in f.names():
        w, w_ft, w_out = (c.get(name, dtype=torch.float64) for c in (b, f, out))
        if name not in matrices:
            assert torch.equal(out.get(name), f.get(name)), name
            continue
        delta = w_ft - w
        expected = w + delta * min(1.0, cap / float(delta.norm()))
        assert torch.allclose(w_out, expected, atol=1e-6), name
        assert abs(matrices[name]["after"] - min(cap, float(delta.norm()))) < 1e-9
        assert not torch.equal(loose.get(name), out.get(name)), name  # --max-norm changes the output
        assert torch.equal(some.get(name), (out if "q_proj" in name else f).get(name)), name  # --include does
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert "Updates clipped" in (tmp_path / "again.html").read_text()
    in_memory = open_checkpoint(tmp_path / "memory.safetensors")  # the API, on models in memory: the same tensors
    assert set(in_memory.names()) == set(out.names())
    assert all(torch.equal(in_memory.get(n), out.get(n)) for n in out.names())
