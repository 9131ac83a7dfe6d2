"""`weightlab mitigate-intruders`: planted intruders are found and scaled, nothing else changes,
and on a PEFT adapter the result agrees with PEFT's own `reduce_intruder_dimension`."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from weightlab.io import open_checkpoint, open_finetuned, open_weights
from weightlab.io.adapter import LoraAdapter
from weightlab.surgery.intruders import IntruderOptions, mitigate_intruders

PLANTED = "layers.1.mlp.down_proj.weight"


@pytest.fixture()
def planted(zoo, tmp_path):
    """The tiny Llama with one rank-one direction far from every base direction added to one
    matrix, strong enough to be W''s top singular vector; every other tensor is the base's."""
    ft = tmp_path / "planted"
    shutil.copytree(zoo["llama"], ft)
    tensors = load_file(ft / "model.safetensors")
    w = tensors[PLANTED].double()
    u = torch.linalg.svd(w, full_matrices=False)[0]
    signs = torch.tensor([(-1.0) ** (i * i // 3) for i in range(u.shape[1])], dtype=torch.float64)
    x = u @ signs  # |cos| = 1/√32 with every base direction: an intruder by construction
    y = torch.randn(w.shape[1], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sigma = 3 * float(torch.linalg.svdvals(w)[0])
    tensors[PLANTED] = (w + sigma * torch.outer(x / x.norm(), y / y.norm())).to(tensors[PLANTED].dtype)
    save_file(tensors, ft / "model.safetensors", metadata={"format": "pt"})
    return ft


def _expected(w: torch.Tensor, w_ft: torch.Tensor, scale: float, top_k: int = 10, epsilon: float = 0.5) -> torch.Tensor:
    """The paper's (and PEFT's) formula with plain float64 SVDs."""
    u0 = torch.linalg.svd(w.double(), full_matrices=False)[0]
    u, s, vh = torch.linalg.svd(w_ft.double(), full_matrices=False)
    best = (u.T @ u0).abs().max(1).values[:top_k]
    intruders = torch.where(best < epsilon)[0]
    return w_ft.double() + (scale - 1) * (u[:, intruders] * s[intruders]) @ vh[intruders]


def test_a_planted_intruder_is_found_scaled_and_nothing_else_changes(zoo, planted, run_cli, tmp_path):
    out = tmp_path / "mitigated"
    code, stdout, err = run_cli("mitigate-intruders", zoo["llama"], planted, "-o", out, "--json", tmp_path / "r.json")
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    hit = {m["name"]: m["intruders"] for m in report["matrices"] if m["intruders"]}
    assert hit == {PLANTED: [0]}
    before, after = load_file(planted / "model.safetensors"), load_file(out / "model.safetensors")
    base = load_file(zoo["llama"] / "model.safetensors")
    assert set(before) == set(after)
    for name in before:
        if name != PLANTED:
            assert torch.equal(before[name], after[name]), name
    expected = _expected(base[PLANTED], before[PLANTED], 0.75)
    assert torch.allclose(after[PLANTED].double(), expected, atol=1e-5)
    sv_before = torch.linalg.svdvals(before[PLANTED].double())
    sv_after = torch.linalg.svdvals(after[PLANTED].double())
    assert float(sv_after[0]) == pytest.approx(max(0.75 * float(sv_before[0]), float(sv_before[1])), rel=1e-4)
    assert (out / "config.json").is_file()
    assert "1 intruder dimensions in 1 of" in stdout


def test_lambda_zero_removes_the_direction_and_one_keeps_the_fine_tune(zoo, planted):
    base, ft = open_weights(zoo["llama"]), open_weights(planted)
    for scale in (0.0, 1.0):
        from weightlab.io.writer import CheckpointWriter, stored_plan

        target = planted.parent / f"out{scale}"
        with CheckpointWriter(target, plan=stored_plan(ft)) as writer:
            mitigate_intruders(base, ft, str(target), IntruderOptions(scale=scale), writer)
        got = load_file(target / "model.safetensors")[PLANTED].double()
        assert torch.allclose(got, _expected(base.get(PLANTED), ft.get(PLANTED), scale), atol=1e-5)


def test_an_adapter_gives_an_exact_adapter_that_agrees_with_peft(zoo, adapters, tmp_path, run_cli):
    from peft import PeftModel
    from peft.tuners.lora.intruders import reduce_intruder_dimension
    from transformers import AutoModel

    out = tmp_path / "mitigated-adapter"
    code, _, err = run_cli(
        "mitigate-intruders", zoo["llama"], adapters["llama"], "-o", out, "--json", tmp_path / "r.json"
    )
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    ours = {m["name"].removesuffix(".weight"): len(m["intruders"]) for m in report["matrices"]}
    assert sum(ours.values()) > 0, "the fixture adapter should have intruders to test with"

    base = open_weights(zoo["llama"])
    original, mitigated = open_finetuned(adapters["llama"], base), open_finetuned(out, base)
    assert isinstance(open_checkpoint(out), LoraAdapter)
    model = AutoModel.from_pretrained(zoo["llama"])  # the class the adapter was saved from
    peft_model = PeftModel.from_pretrained(model, adapters["llama"])
    logged = []
    reduce_intruder_dimension(peft_model, logging_sink=logged.append)
    peft_counts = {}
    for line in logged:
        if ": Intruders: " in line or ": No intruders" in line:
            layer, _, rest = line.partition(": ")
            peft_counts[layer.removeprefix("base_model.model.")] = int(rest.split()[-1]) if "Intruders:" in rest else 0
    assert peft_counts == ours
    modules = dict(peft_model.named_modules())
    for name, count in ours.items():
        w, w_old, w_new = base.get(name + ".weight"), original.get(name + ".weight"), mitigated.get(name + ".weight")
        expected = _expected(w, w_old, 0.75)
        assert torch.allclose(w_new.double(), expected, atol=2e-5), name  # exact (rank r + intruders)
        layer = modules["base_model.model." + name]
        r = layer.r["default"]
        peft_delta = layer.get_delta_weight("intruder_reduced").double()
        u, s, vh = torch.linalg.svd(expected - w.double(), full_matrices=False)
        assert torch.allclose(peft_delta, (u[:, :r] * s[:r]) @ vh[:r], atol=5e-5), name  # PEFT re-truncates to r
        new_rank = open_checkpoint(out).modules[name].rank
        assert new_rank == r + count


def test_bad_input_is_refused_and_nothing_written(zoo, run_cli, tmp_path):
    code, _, err = run_cli("mitigate-intruders", zoo["llama"], zoo["llama_ft"], "-o", tmp_path / "x", "--lambda", "1.5")
    assert code == 2 and "--lambda" in err and not (tmp_path / "x").exists()
    code, _, err = run_cli("mitigate-intruders", zoo["llama"], zoo["llama_ft"], "-o", zoo["llama_ft"] / "inside")
    assert code == 2 and "inside the input" in err
    code, _, err = run_cli("mitigate-intruders", zoo["llama"], zoo["gpt2"], "-o", tmp_path / "y")
    assert code == 2 and not (tmp_path / "y").exists()


def test_a_bfloat16_fine_tune_keeps_its_untouched_bytes(zoo, planted, run_cli, tmp_path):
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(planted / "model.safetensors").items()}
    save_file(tensors, planted / "model.safetensors", metadata={"format": "pt"})
    code, _, err = run_cli("mitigate-intruders", zoo["llama"], planted, "-o", tmp_path / "out")
    assert code == 0, err
    after = load_file(tmp_path / "out" / "model.safetensors")
    assert all(after[n].dtype == torch.bfloat16 for n in after)
    assert all(torch.equal(after[n], tensors[n]) for n in tensors if n != PLANTED)
    assert not torch.equal(after[PLANTED], tensors[PLANTED])
