"""Quantized safetensors read as the weights their own libraries decode: AutoGPTQ (act-order
g_idx included), AutoAWQ's GEMM packing, bitsandbytes NF4 (double quantization), FP4 and int8,
FP8 blocks, compressed-tensors' pack-quantized (symmetric, asymmetric, 3-bit straddling words)
and MLX (4- and 3-bit). Fixtures: tests/fixtures/quantized/make_fixtures.py, made by each
library, with each library's own dequantized output beside them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import weightlab as wl
from weightlab.io import open_checkpoint

FIXTURES = Path(__file__).parent / "fixtures" / "quantized"
FORMATS = sorted(p.stem for p in (FIXTURES / "expected").iterdir())
ORIGINAL = load_file(FIXTURES / "original.safetensors")
# ‖Q − W‖/‖W‖ each format must stay under on these Gaussian weights
# (measured: 8.1%, 0.54%, 9.1%, 9.3%, 12%, 0.71%, 2.7%, 9.5%, 9.1%, 26%, 9.1%, 17%)
ERROR = {"gptq-4bit-act-order": 0.1, "gptq-8bit": 0.007, "awq-gemm": 0.11, "bnb-nf4": 0.11, "bnb-fp4": 0.15,
         "bnb-int8": 0.009, "fp8-block": 0.035, "ct-pack-int4-sym": 0.12, "ct-pack-int4-asym": 0.11,
         "ct-pack-int3": 0.32, "mlx-4bit": 0.11, "mlx-3bit": 0.21}  # fmt: skip


@pytest.mark.parametrize("form", FORMATS)
def test_each_format_reads_as_its_own_library_decodes_it(form):
    ckpt = open_checkpoint(FIXTURES / form)
    expected = load_file(FIXTURES / "expected" / f"{form}.safetensors")
    assert set(expected) <= set(ckpt.names())
    for name, want in expected.items():
        got = ckpt.get(name)
        assert got.dtype == want.dtype and torch.equal(got, want), (
            form,
            name,
            (got.float() - want.float()).abs().max(),
        )
        assert ckpt.info(name).stored is not None


@pytest.mark.parametrize("form", FORMATS)
def test_each_format_holds_the_original_within_its_error_and_says_how_it_is_stored(form):
    ckpt = open_checkpoint(FIXTURES / form)
    for name, w in ORIGINAL.items():
        q = ckpt.get(name, dtype=torch.float32)
        assert float((q - w).norm() / w.norm()) < ERROR[form], name
        stored = ckpt.info(name).stored
        assert 2 < stored.bits_per_weight < 17 and stored.nbytes > 0
    assert ckpt.get("model.layers.0.input_layernorm.weight").dtype == torch.float16  # the rest as stored


def _variant(tmp_path, form, change, config=None):
    """A copy of a fixture with some stored tensors changed (`change(tensors)` edits the dict)."""
    folder = tmp_path / form
    shutil.copytree(FIXTURES / form, folder)
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors")
    if config is not None:
        raw = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(config(raw)))
    return folder


Q = "model.layers.0.self_attn.q_proj"


def _first_row_of_scales(t):
    t[f"{Q}.weight_scale_inv"] = t[f"{Q}.weight_scale_inv"][:1]


HOSTILE = {
    "gptq g_idx too short": ("gptq-4bit-act-order", lambda t: t.update({f"{Q}.g_idx": t[f"{Q}.g_idx"][:-8]}), None,
                             "g_idx has [248] entries for 256 input columns"),
    "gptq g_idx past the groups": ("gptq-4bit-act-order", lambda t: t[f"{Q}.g_idx"].__setitem__(3, 99), None,
                                   "g_idx names groups outside 0..7"),
    "gptq without zeros": ("gptq-8bit", lambda t: t.pop(f"{Q}.qzeros"), None, f"has no {Q}.qzeros"),
    "awq scales of another shape": ("awq-gemm", lambda t: t.update({f"{Q}.scales": t[f"{Q}.scales"][:2]}), None,
                                    "scales are [2, 64], not [4, 64]"),
    "mlx biases missing": ("mlx-4bit", lambda t: t.pop(f"{Q}.biases"), None, "has scales but no"),
    "bnb state not JSON": ("bnb-nf4", lambda t: t[f"{Q}.weight.quant_state.bitsandbytes__nf4"].__setitem__(0, 7), None,
                           "quant state is not JSON"),
    "fp8 scales that do not tile": ("fp8-block", _first_row_of_scales,
                                    None, "do not tile"),
    "unknown method": ("awq-gemm", lambda t: None,
                       lambda c: {**c, "quantization_config": {**c["quantization_config"], "quant_method": "hqq"}},
                       "names 'hqq', which weightlab does not read"),
    "awq gemv layout": ("awq-gemm", lambda t: None,
                        lambda c: {**c, "quantization_config": {**c["quantization_config"], "version": "gemv"}},
                        "the gemv layout is not read"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(HOSTILE), ids=str)
def test_a_damaged_quantized_checkpoint_is_refused_in_one_line(case, tmp_path, run_cli):
    form, change, config, message = HOSTILE[case]
    folder = _variant(tmp_path, form, change, config)
    code, _, err = run_cli("quant-error", FIXTURES / "awq-gemm", folder)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and message in lines[0] and str(folder) in lines[0], err


@pytest.mark.parametrize("form", ["gptq-8bit", "awq-gemm", "mlx-4bit", "ct-pack-int4-sym"])
def test_nan_scales_are_refused_naming_the_matrix(form, tmp_path, run_cli):
    scale = {"mlx-4bit": ".scales", "ct-pack-int4-sym": ".weight_scale"}.get(form, ".scales")
    folder = _variant(tmp_path, form, lambda t: t[f"{Q}{scale}"].view(-1).__setitem__(0, float("nan")))
    code, _, err = run_cli("spectrum", FIXTURES / "awq-gemm", folder)
    assert code == 2 and "NaN or Inf" in err and f"{Q}.weight" in err and str(folder) in err, err


def test_quant_error_reads_every_format_against_the_original(tmp_path):
    """The analysis over the formats at once: bits per weight as stored, and errors as measured above."""
    reference = tmp_path / "original"
    reference.mkdir()
    save_file(ORIGINAL, reference / "model.safetensors")
    result = wl.quant_error(reference, [FIXTURES / f for f in FORMATS])
    for i, summary in enumerate(result.models()):
        assert summary["relative_error"] < ERROR[FORMATS[i]]
        assert summary["matrices"] == 2
    bits = {FORMATS[m.quantized]: m.bits_per_weight for m in result.matrices}
    assert bits["gptq-8bit"] == pytest.approx(8.875) and bits["mlx-4bit"] == pytest.approx(4.5)


def test_a_merge_of_quantized_checkpoints_is_written_in_full_precision(tmp_path):
    report = wl.merge(None, [FIXTURES / "gptq-8bit", FIXTURES / "awq-gemm"], method="average", out=tmp_path / "m")
    assert report.dequantized == {
        str(FIXTURES / "gptq-8bit"): "GPTQ int8 g64",
        str(FIXTURES / "awq-gemm"): "AWQ int4 g64",
    }
    merged = load_file(tmp_path / "m" / "model.safetensors")
    assert set(merged) == {
        f"{Q}.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.0.input_layernorm.weight",
    }
    assert merged[f"{Q}.weight"].dtype == torch.float16  # GPTQ's and AWQ's own precision, never re-quantized
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "quantization_config" not in config, "the output is not quantized: its config must not say it is"
