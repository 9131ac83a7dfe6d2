"""`quant-error` against planted errors and independent computations: white noise reads as
noise-like, a rank-one error as structured; every figure equals numpy's or `esd`'s on the same
matrices; real quantizations (gguf's own Q8_0 and Q4_0 quantizers on the llama fixture) land
where the formats put them."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import GGUF_FIXTURES, requantized, shown_nan
from safetensors.torch import save_file

import weightlab as wl
from weightlab.analysis.esd import fit_power_law


def _model(folder, tensors):
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    return folder


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """W (two layers of heavy-tailed 256×192 matrices), a copy with white noise of 3% relative
    size, and one with a rank-one error of the same size."""
    root = tmp_path_factory.mktemp("planted")
    g = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(2) for p in ("q", "v")]
    w = {n: torch.randn(256, 192, generator=g) @ torch.diag(torch.linspace(3, 0.1, 192)) for n in names}
    noise, structured = {}, {}
    for n, x in w.items():
        e = torch.randn(x.shape, generator=g)
        noise[n] = x + 0.03 * x.norm() * e / e.norm()
        r = torch.outer(torch.randn(256, generator=g), torch.randn(192, generator=g))
        structured[n] = x + 0.03 * x.norm() * r / r.norm()
    return _model(root / "w", w), _model(root / "noise", noise), _model(root / "structured", structured), w, noise


def test_white_noise_is_noise_like_and_a_rank_one_error_is_structured(planted):
    reference, noise, structured, *_ = planted
    result = wl.quant_error(reference, {"noise": noise, "structured": structured})
    by_model = {
        0: [m for m in result.matrices if m.quantized == 0],
        1: [m for m in result.matrices if m.quantized == 1],
    }
    for m in by_model[0]:
        assert 0.85 < m.flatness < 1.15 and m.noise_like and m.spikes == 0
    for m in by_model[1]:
        assert m.flatness < 0.05 and not m.noise_like
        assert m.spikes == 1 and m.spike_share > 0.999
    for models in by_model.values():
        for m in models:
            assert m.relative_error == pytest.approx(0.03, rel=1e-5)
            assert m.snr_db == pytest.approx(-20 * math.log10(0.03), rel=1e-5)
    summary = result.models()
    assert summary[0]["noise_like_share"] == 1 and summary[1]["noise_like_share"] == 0
    assert summary[0]["relative_error"] == pytest.approx(0.03, rel=1e-5)


def test_every_figure_matches_an_independent_computation(planted):
    reference, noise, _, w, q = planted
    result = wl.quant_error(reference, noise, top_k=4)
    for m in result.matrices:
        x, y = w[m.name].double().numpy(), q[m.name].double().numpy()
        s, s_q = np.linalg.svd(x, compute_uv=False), np.linalg.svd(y, compute_uv=False)
        u = np.linalg.svd(x)[0][:, :4]
        u_q = np.linalg.svd(y)[0][:, :4]
        assert m.relative_error == pytest.approx(np.linalg.norm(y - x) / np.linalg.norm(x), rel=1e-6)
        np.testing.assert_allclose(m.sv_ratio, s_q[:4] / s[:4], rtol=1e-6)
        assert m.subspace_similarity == pytest.approx(np.sum((u.T @ u_q) ** 2) / 4, abs=1e-6)
        assert m.alpha_reference == pytest.approx(fit_power_law(s**2).alpha, rel=1e-6)
        assert m.alpha_quantized == pytest.approx(fit_power_law(s_q**2).alpha, rel=1e-6)
        e = np.linalg.svd(y - x, compute_uv=False) ** 2
        white = 256 * 192 / (math.sqrt(256) + math.sqrt(192)) ** 2
        assert m.flatness == pytest.approx(e.sum() / e[0] / white, rel=1e-6)
        assert m.bits_per_weight == 32 and m.stored_as == "F32"


def test_esd_and_quant_error_agree_on_alpha(planted):
    reference, noise, *_ = planted
    esd = {m.name: m.weights.alpha for m in wl.esd(noise, traps=False).matrices}
    for m in wl.quant_error(reference, noise).matrices:
        assert m.alpha_quantized == pytest.approx(esd[m.name], rel=1e-9)


@pytest.fixture(scope="module")
def quantized_llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    return {k: requantized(GGUF_FIXTURES / "llama.bf16.gguf", root / f"llama.{k}.gguf", k) for k in ("Q8_0", "Q4_0")}


def test_gguf_quantizations_land_where_their_formats_put_them(quantized_llama):
    result = wl.quant_error(GGUF_FIXTURES / "llama", quantized_llama)
    q8, q4 = result.models()
    assert q8["bits_per_weight"] == pytest.approx(8.5) and q4["bits_per_weight"] == pytest.approx(4.5)
    # Gaussian weights: Q8_0 rounds to 1/127 of each block's max, Q4_0 to 1/8 of it
    assert 0.003 < q8["relative_error"] < 0.008 and 0.06 < q4["relative_error"] < 0.11
    assert q8["noise_like_share"] == 1 and q4["noise_like_share"] == 1
    assert q8["mean_subspace_similarity"] > q4["mean_subspace_similarity"] > 0.8
    assert q4["worst_layers"] and set(q4["worst_layers"]) <= {0, 1}
    for m in result.matrices:
        assert m.stored_as == ("Q8_0", "Q4_0")[m.quantized]


def test_an_exact_copy_has_no_error_and_says_so(run_cli):
    code, out, _ = run_cli("quant-error", GGUF_FIXTURES / "llama", GGUF_FIXTURES / "llama.bf16.gguf")
    assert code == 0 and "every matrix is exactly the reference's" in out
    result = wl.quant_error(GGUF_FIXTURES / "llama", GGUF_FIXTURES / "llama.bf16.gguf")
    assert all(m.relative_error == 0 and m.snr_db is None and m.flatness is None for m in result.matrices)
    assert result.models()[0]["worst_layers"] == [] and result.models()[0]["noise_like_share"] is None


def test_the_report_shows_the_analysis_without_nan(quantized_llama, tmp_path, run_cli):
    report = tmp_path / "q.html"
    code, _, err = run_cli(
        "quant-error",
        GGUF_FIXTURES / "llama",
        quantized_llama["Q4_0"],
        "--report",
        report,
        "--json",
        tmp_path / "q.json",
    )
    assert code == 0, err
    html = report.read_text()
    assert "Quantization: what it did to each matrix" in html and not shown_nan(html)
    code, _, err = run_cli("report", tmp_path / "q.json", "-o", tmp_path / "again.html")
    assert code == 0, err
    assert "Quantization: what it did to each matrix" in (tmp_path / "again.html").read_text()


def test_a_lora_of_the_error_leaves_what_eckart_young_says(quantized_llama, tmp_path):
    """The LoftQ question: Q + BA against W, with BA the rank-r SVD of W − Q that extract-lora
    takes from the quantized model to the reference. What is left of each targeted matrix's error
    is exactly its singular values past r; the rest keep theirs."""
    q4 = quantized_llama["Q4_0"]
    wl.extract_lora(q4, GGUF_FIXTURES / "llama", rank=16, out=tmp_path / "fix")
    plain = {m.name: m for m in wl.quant_error(GGUF_FIXTURES / "llama", q4).matrices}
    fixed = wl.quant_error(GGUF_FIXTURES / "llama", q4, tmp_path / "fix")
    assert fixed.quantized == [f"{q4} + {tmp_path / 'fix'}"]
    reference, quantized = wl_open(GGUF_FIXTURES / "llama"), wl_open(q4)
    for m in fixed.matrices:
        if m.role in ("embed", "head"):  # not targeted: the same error as without the LoRA
            assert m.relative_error == pytest.approx(plain[m.name].relative_error, rel=1e-9)
            continue
        w = reference.get(m.name, dtype=torch.float64)
        s = torch.linalg.svdvals(quantized.get(m.name, dtype=torch.float64) - w)
        assert m.relative_error == pytest.approx(float(s[16:].norm() / w.norm()), rel=1e-4)
        assert m.relative_error < plain[m.name].relative_error
        assert m.stored_as == "Q4_0"


def wl_open(path):
    from weightlab.io import open_checkpoint

    return open_checkpoint(path)
