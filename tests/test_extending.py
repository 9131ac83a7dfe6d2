"""docs/extending.md's worked analysis, as printed there, is a working command: loaded as the two
modules the page names, it runs on a real checkpoint and its JSON makes a report."""

import json
import re
import subprocess
import sys
from pathlib import Path

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
exec(compile(blocks["weightlab/options.py"], "weightlab/options.py", "exec"), weightlab.options.__dict__)
load("weightlab.analysis.norms", blocks["weightlab/analysis/norms.py"])
import weightlab.cli.commands as commands  # the real app, with every built-in command
load("weightlab.cli.norms", blocks["weightlab/cli/norms.py"])
out = Path(sys.argv[3])
code = commands.run(["norms", sys.argv[2], "--top", "2", "--json", str(out / "n.json"), "--csv", str(out / "n.csv"),
                     "--report", str(out / "n.html")])
code = code or commands.run(["report", str(out / "n.json"), "-o", str(out / "again.html")])
sys.exit(code)
"""


def test_the_worked_analysis_runs_as_printed(zoo, tmp_path):
    blocks = dict(
        re.findall(r"```python\n# (weightlab/\S*(?:norms|options)\.py)\n(.*?)```", PAGE.read_text(), flags=re.S)
    )
    assert set(blocks) == {"weightlab/options.py", "weightlab/analysis/norms.py", "weightlab/cli/norms.py"}
    (tmp_path / "blocks.json").write_text(json.dumps(blocks))
    done = subprocess.run(
        [sys.executable, "-c", RUN, tmp_path / "blocks.json", zoo["llama"], tmp_path],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads((tmp_path / "n.json").read_text())
    assert result["schema"] == "weightlab.norms/1" and result["matrices"]
    import torch

    from weightlab.io import open_checkpoint

    ckpt = open_checkpoint(zoo["llama"])
    for m in result["matrices"]:
        expected = torch.linalg.svdvals(ckpt.get(m["name"], dtype=torch.float32))[:2].tolist()
        assert len(m["top"]) == 2 and all(abs(g - e) < 1e-4 * expected[0] for g, e in zip(m["top"], expected))
    assert "Largest singular values" in (tmp_path / "again.html").read_text()
    assert (tmp_path / "n.csv").read_text().startswith("name,layer,top")
