"""Property: whatever values a user types for a command's options, weightlab exits 0 or 2, never
with a traceback, and a refused command (exit 2) writes nothing."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from conftest import exit_code
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

VALUES = st.one_of(
    st.integers(-(10**20), 10**20).map(str),
    st.integers(-3, 40).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(
        [
            "nan",
            "inf",
            "-inf",
            "1e400",
            "0",
            "-0",
            "0.5",
            "1",
            "",
            "abc",
            "(",
            "cuda:9",
            "float16",
            "1,-1",
            "nan,1",
            "0.3,0.7",
            "5GB",
            "-1GB",
            "left",
            "both",
            "pissa",
            "ties",
        ]
    ),
    st.text(max_size=6),
)

# command template and the options it takes; {base}, {ft}, {ft2}, {adapter} are real tiny checkpoints
COMMANDS = {
    "spectrum": (
        "spectrum {base} {ft} --json {out}/r.json",
        ["-k", "--intruder-k", "--epsilon", "--keep", "--rows", "--include", "--exclude", "--device", "--dtype"],
    ),
    "angles": ("angles {ft} {ft2} --base {base} --json {out}/r.json", ["-k", "--side", "--svd", "--seed", "--rows"]),
    "gaussian": (
        "gaussian {ft} --base {base} --json {out}/r.json",
        ["--sample-size", "--min-elements", "--seed", "--rows"],
    ),
    "tsd": ("tsd {base} {ft} --json {out}/r.json", ["--top", "--keep", "--rows", "--dtype"]),
    "merge": (
        "merge --method ties --base {base} {ft} {ft2} -o {out}/m",
        ["--lambda", "--density", "--weights", "--shard-size", "--dtype", "--method"],
    ),
    "merge-dare": (
        "merge --method dare-linear --base {base} {ft} {ft2} -o {out}/m",
        ["--lambda", "--density", "--seed", "--weights", "--coeff", "--nan-power"],
    ),
    "extract-lora": ("extract-lora {base} {ft} -o {out}/a", ["--rank", "--energy", "--targets"]),
    "init-lora": ("init-lora {base} -o {out}/a --no-residual", ["--rank", "--alpha", "--method", "--svd", "--seed"]),
    "inspect": ("inspect {adapter} --json {out}/r.json", ["--filter"]),
}


@pytest.fixture(scope="module")
def paths(zoo, adapters, tmp_path_factory) -> dict[str, str]:
    from weightlab import synthetic

    ft2 = synthetic.save(
        synthetic.finetune(synthetic.tiny_model("llama", seed=0), steps=3, seed=4),
        tmp_path_factory.mktemp("ft2") / "ft2",
    )
    return {"base": str(zoo["llama"]), "ft": str(zoo["llama_ft"]), "ft2": str(ft2), "adapter": str(adapters["llama"])}


@pytest.mark.parametrize("command", COMMANDS)
def test_any_option_values_exit_0_or_2_and_a_refusal_writes_nothing(command, paths, capsys):
    template, flags = COMMANDS[command]

    @settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(st.lists(st.tuples(st.sampled_from(flags), VALUES), min_size=1, max_size=3))
    def check(options):
        out = Path(tempfile.mkdtemp(prefix="wl-prop-"))
        try:
            args = template.format(out=out, **paths).split()
            for flag, value in options:
                args += [flag, value]
            code = exit_code(args)
            err = capsys.readouterr().err
            assert code in (0, 2), (args, err)
            assert "Traceback" not in err
            if code == 2:
                assert list(out.iterdir()) == [], (args, err)
                assert len([line for line in err.splitlines() if line.strip()]) == 1, err
        finally:
            shutil.rmtree(out, ignore_errors=True)

    check()
