"""`weightlab inspect` and the CLI's error contract: one line, non-zero exit, nothing written."""

from __future__ import annotations

import json

import pytest


def test_inspect_lists_tensors_and_totals(run_cli, zoo):
    code, out, err = run_cli("inspect", zoo["llama"])
    assert code == 0, err
    assert "layers.0.self_attn.q_proj.weight" in out and "totals per storage format" in out


def test_inspect_json_to_stdout_is_machine_readable(run_cli, zoo):
    code, out, _ = run_cli("inspect", zoo["gpt2"], "--filter", r"h\.1\.", "--json", "-")
    data = json.loads(out)
    assert code == 0 and data["schema"] == "weightlab.inventory/1"
    assert data["model_type"] == "gpt2" and data["num_layers"] == 2
    assert data["tensors"] and all(".1." in t["name"] for t in data["tensors"])
    assert data["parameters"] == sum(t["parameters"] for t in data["tensors"])


def test_inspect_adapter_reports_ranks(run_cli, adapters, tmp_path):
    code, _out, _ = run_cli(
        "inspect", adapters["llama_rslora_pattern"], "--json", tmp_path / "a.json", "--csv", tmp_path / "a.csv"
    )
    data = json.loads((tmp_path / "a.json").read_text())
    assert code == 0 and data["kind"] == "lora-adapter"
    assert data["adapter"]["layers.0.self_attn.o_proj"]["rank"] == 2
    assert (tmp_path / "a.csv").read_text().startswith("name,shape,dtype,parameters,bytes,layer,role")


@pytest.mark.parametrize(
    "case", ["truncated", "garbage_header", "header_too_long", "missing_shard", "not_a_checkpoint"]
)
def test_bad_input_is_one_line_with_nonzero_exit_and_writes_nothing(run_cli, corrupt, case, tmp_path):
    out_json = tmp_path / "out.json"
    code, _out, err = run_cli("inspect", corrupt[case], "--json", out_json)
    assert code == 2
    assert err.startswith("error: ") and str(corrupt[case]) in err.replace("\n", "")
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 2  # one logical line (may soft-wrap)
    assert not out_json.exists()


def test_debug_shows_the_traceback(run_cli, corrupt):
    from weightlab.errors import CorruptCheckpoint

    with pytest.raises(CorruptCheckpoint):
        run_cli("--debug", "inspect", corrupt["truncated"])


def test_existing_output_needs_force(run_cli, zoo, tmp_path):
    target = tmp_path / "x.json"
    target.write_text("keep me")
    code, _, err = run_cli("inspect", zoo["bert"], "--json", target)
    assert code == 2 and "--force" in err and target.read_text() == "keep me"
    code, _, _ = run_cli("inspect", zoo["bert"], "--json", target, "--force")
    assert code == 0 and json.loads(target.read_text())["kind"] == "safetensors"


def test_bad_regex_is_a_clear_error(run_cli, zoo):
    code, _, err = run_cli("inspect", zoo["bert"], "--filter", "(")
    assert code == 2 and "--filter" in err


def test_every_command_help_has_an_example(run_cli):
    from weightlab.cli.app import app

    for command in app.registered_commands:
        code, out, _ = run_cli(command.name or command.callback.__name__, "--help")
        assert code == 0 and "Example:" in out, command
