"""The merge registry is the one source of truth: config validation, --param, --help, the
mergekit mapping and docs/merge.md all come from it, and a new method is one entry."""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from weightlab.domains import Real
from weightlab.errors import InvalidArgument
from weightlab.merging import merge
from weightlab.merging.config import build_config
from weightlab.merging.methods import (
    LAMBDA,
    MERGEKIT_REQUIRED,
    METHODS,
    MergeMethod,
    Param,
    mergekit_names,
    methods_table,
)
from weightlab.merging.recipes import load_config

DOCS = Path(__file__).resolve().parents[1] / "docs" / "merge.md"


def test_docs_methods_table_is_the_registry():
    text = DOCS.read_text()
    table = text.split("keeps it equal -->\n", 1)[1].split("\n<!-- end of methods table -->", 1)[0]
    assert table == methods_table()


@pytest.mark.parametrize("method", [m for m in METHODS.values() if not m.nan], ids=lambda m: m.name)
def test_each_method_function_cites_its_paper(method):
    first_author = method.reference.split()[0]
    assert first_author in (method.fn.__doc__ or ""), (method.name, method.reference)


def test_help_lists_every_method_with_its_parameters(run_cli):
    code, out, _ = run_cli("merge", "--help")
    assert code == 0
    for m in METHODS.values():
        assert m.name in out and all(f"{p.name}={p.shown_default}" in out for p in m.params)
    assert "--param" in out and "--gamma" not in out  # method-specific parameters are not global flags


@pytest.mark.parametrize("mergekit, ours", sorted(mergekit_names().items()))
def test_every_mergekit_name_loads_as_its_method(mergekit, ours, tmp_path):
    spec = METHODS[ours]
    assert spec.mergekit == mergekit
    # what mergekit requires (a weight per model, slerp's t), as many models as the method takes
    required = [name for name, default in spec.mergekit_defaults.items() if default is MERGEKIT_REQUIRED] + [
        p.name for p in spec.params if p.required
    ]
    per_model = "".join(f"\n    parameters: {{{name}: 0.5}}" for name in required if name == "weight")
    shared = ", ".join(f"{name}: 0.5" for name in required if name != "weight")
    count = 1 if ours in ("slerp", "nearswap", "arcee-fusion", "passthrough") else 2
    models = "".join(f"  - model: {m}{per_model}\n" for m in "ab"[:count])
    base = "" if spec.mergekit_base == "input" else "base_model: base\n"
    (tmp_path / "mk.yml").write_text(
        f"merge_method: {mergekit}\n{base}models:\n{models}" + (f"parameters: {{{shared}}}\n" if shared else "")
    )
    assert build_config(load_config(tmp_path / "mk.yml")).method == ours


@pytest.mark.parametrize(
    "given, message",
    [
        ({"gamma": 0.1}, r"ties does not use gamma \(its parameters: lambda, density, normalize\)"),
        ({"density": 0.0}, r"--density 0: must be a finite number in \(0, 1\]"),
        ({"lambda": float("inf")}, r"--lambda inf"),
    ],
)
def test_parameters_are_checked_against_the_method_declaration(given, message):
    with pytest.raises(InvalidArgument, match=message):
        build_config({"method": "ties", "base": "b", "models": ["a"], "param_values": given})


def test_a_yaml_nan_block_without_nan_coefficients_is_refused(tmp_path):
    (tmp_path / "c.yml").write_text("method: ties\nbase: b\nmodels: [a]\nnan: {power: 2}\n")
    with pytest.raises(InvalidArgument, match="needs coeff: nan"):
        load_config(tmp_path / "c.yml")


def _two(tmp_path):
    gen = torch.Generator().manual_seed(0)
    base = {"layers.0.mlp.up_proj.weight": torch.randn(6, 4, generator=gen)}
    paths = {}
    for name, shift in (("base", 0.0), ("a", 1.0), ("b", -0.5)):
        (tmp_path / name).mkdir()
        save_file({k: v + shift for k, v in base.items()}, tmp_path / name / "model.safetensors")
        paths[name] = str(tmp_path / name)
    return paths


def test_param_option_reaches_the_method_and_the_record(tmp_path, run_cli):
    p = _two(tmp_path)
    code, _, err = run_cli(
        "merge",
        "--method",
        "breadcrumbs",
        "--base",
        p["base"],
        p["a"],
        p["b"],
        "--param",
        "gamma=0.25",
        "--density",
        "0.5",
        "-o",
        tmp_path / "m",
    )
    assert code == 0, err
    record = json.loads((tmp_path / "m" / "weightlab_merge.json").read_text())
    assert record["config"]["params"] == {
        "lam": 1.0,
        "density": 0.5,
        "gamma": 0.25,
        "normalize": False,
        "rescale": "none",
    }
    code, _, err = run_cli(
        "merge", "--method", "ties", "--base", p["base"], p["a"], "--param", "gamma=0.25", "-o", tmp_path / "x"
    )
    assert (
        code == 2
        and "ties does not use gamma (its parameters: lambda, density, normalize)" in err
        and not (tmp_path / "x").exists()
    )
    code, _, err = run_cli(
        "merge", "--method", "ties", "--base", p["base"], p["a"], "--param", "density", "-o", tmp_path / "x"
    )
    assert code == 2 and "NAME=VALUE" in err


def scaled_mean(base, models, coeffs, p, gen):
    """θ_b + β·mean_i τ_i (a toy method for this test; no paper)."""
    return base + p.beta * torch.stack([m - base for m in models]).mean(0)


def test_a_new_method_is_one_function_and_one_entry(tmp_path, monkeypatch):
    beta = Param("beta", Real(0, 10), 1.0, "scale of the mean task vector")
    monkeypatch.setitem(
        METHODS,
        "scaled-mean",
        MergeMethod("scaled-mean", scaled_mean, "θ_b + β·mean τ_i", "toy", (beta,), coefficients=False),
    )
    p = _two(tmp_path)
    cfg = build_config(
        {"method": "scaled-mean", "base": p["base"], "models": [p["a"], p["b"]], "param_values": {"beta": 2.0}}
    )
    merge(cfg, tmp_path / "m")
    got = load_file(next((tmp_path / "m").glob("*.safetensors")))["layers.0.mlp.up_proj.weight"]
    base = load_file(Path(p["base"]) / "model.safetensors")["layers.0.mlp.up_proj.weight"]
    torch.testing.assert_close(got, base + 2.0 * 0.25)  # mean shift (1 − 0.5)/2, scaled by β = 2
    with pytest.raises(InvalidArgument, match=r"--param beta 11"):
        build_config({"method": "scaled-mean", "base": "b", "models": ["a"], "param_values": {"beta": 11}})
    assert "scaled-mean" in methods_table() and re.search(r"`beta` \(1\)", methods_table())
    (tmp_path / "c.yml").write_text(f"method: scaled-mean\nbase: {p['base']}\nmodels: [{p['a']}]\nbeta: 3\n")
    assert build_config(load_config(tmp_path / "c.yml")).resolved.beta == 3
    assert LAMBDA.flag == "--lambda"


@pytest.mark.parametrize("method", [m for m in METHODS if not METHODS[m].calibration])  # those: test_merge_data_aware
def test_every_method_merges_checkpoints_from_the_cli(method, tmp_path, run_cli):
    p = _two(tmp_path)
    spec = METHODS[method]
    base = ["--base", p["base"]] if spec.needs_base else []
    models = [p["a"]] if spec.max_models == 1 else [p["a"], p["b"]]
    required = [a for q in spec.params if q.required for a in ("--param", f"{q.name}=0.5")]
    code, _out, err = run_cli("merge", "--method", method, *base, *models, *required, "-o", tmp_path / "m")
    assert code == 0, err
    merged = load_file(next((tmp_path / "m").glob("*.safetensors")))["layers.0.mlp.up_proj.weight"]
    assert torch.isfinite(merged).all() and merged.shape == (6, 4)
    record = json.loads((tmp_path / "m" / "weightlab_merge.json").read_text())
    assert record["config"]["method"] == method
    assert set(record["config"]["params"]) == {p.field for p in spec.params}


def test_modifiers_from_the_cli_and_yaml_with_their_parameters(tmp_path, run_cli):
    p = _two(tmp_path)
    code, _, err = run_cli(
        "merge",
        "--method",
        "ties",
        "--base",
        p["base"],
        p["a"],
        p["b"],
        "--svc",
        "--lines",
        "--param",
        "svc_alpha=2",
        "--param",
        "lines_beta=0.25",
        "-o",
        tmp_path / "m",
    )
    assert code == 0, err
    record = json.loads((tmp_path / "m" / "weightlab_merge.json").read_text())
    assert record["config"]["modifiers"] == ["svc", "lines"] and record["lines_alpha"] > 0
    assert record["config"]["params"] == {
        "lam": 1.0,
        "density": 1.0,
        "normalize": True,
        "svc_alpha": 2,
        "lines_beta": 0.25,
    }
    code, _, err = run_cli("merge", "--method", "average", p["a"], p["b"], "--svc", "-o", tmp_path / "x")
    assert code == 2 and "svc changes the merged task vector, so it needs --base" in err
    code, _, err = run_cli(
        "merge", "--method", "ties", "--base", p["base"], p["a"], "--param", "svc_alpha=2", "-o", tmp_path / "x"
    )
    assert code == 2 and "does not use svc_alpha" in err
    (tmp_path / "c.yml").write_text(
        f"method: iso-c\nbase: {p['base']}\nmodels: [{p['a']}, {p['b']}]\nmodifiers: [lines]\nlines_beta: 1.0\n"
    )
    cfg = build_config(load_config(tmp_path / "c.yml"))
    assert cfg.modifiers == ["lines"] and cfg.resolved.lines_beta == 1.0


@pytest.mark.parametrize(
    "method", [m.name for m in METHODS.values() if m.coefficients and not m.nan and not m.calibration]
)  # fisher's: test_merge_data_aware
def test_nan_coefficients_plug_into_every_method_that_takes_coefficients(method, tmp_path, run_cli):
    p = _two(tmp_path)
    base = ["--base", p["base"]] if METHODS[method].needs_base else []
    code, _, err = run_cli("merge", "--method", method, *base, p["a"], p["b"], "--coeff", "nan", "-o", tmp_path / "m")
    assert code == 0, err
    record = json.loads((tmp_path / "m" / "weightlab_merge.json").read_text())
    assert record["config"]["coeff"] == "nan" and len(record["coefficients"]) == 2
    assert sum(record["coefficients"]) == pytest.approx(1.0)  # NAN's default normalisation


# ---- --lambda auto: λ per tensor from the task vectors (merging.run.auto_lambda) -------------


def _planted(tmp_path, taus):
    base = torch.zeros(4, 6)
    folders = []
    for i, tau in enumerate([torch.zeros(4, 6), *taus]):
        (tmp_path / f"m{i}").mkdir()
        save_file({"layers.0.mlp.up_proj.weight": base + tau}, tmp_path / f"m{i}" / "model.safetensors")
        folders.append(str(tmp_path / f"m{i}"))
    return folders


def test_auto_lambda_gives_each_merge_the_length_of_the_mean_update(tmp_path, run_cli):
    """λ = ‖Σ τ_i‖/(N‖Δ‖): task arithmetic becomes the mean (λ = 1/N); iso-c keeps its direction
    at the mean update's length."""
    gen = torch.Generator().manual_seed(1)
    taus = [torch.randn(4, 6, generator=gen) for _ in range(3)]
    folders = _planted(tmp_path, taus)
    mean = sum(taus) / 3
    for method in ("task-arithmetic", "iso-c"):
        out = tmp_path / f"out-{method}"
        code, _, err = run_cli(
            "merge", "--method", method, "--base", folders[0], *folders[1:], "--lambda", "auto", "-o", out
        )
        assert code == 0, err
        merged = load_file(out / "model.safetensors")["layers.0.mlp.up_proj.weight"]
        assert float(merged.norm()) == pytest.approx(float(mean.norm()), rel=1e-5)
        record = json.loads((out / "weightlab_merge.json").read_text())
        chosen = record["auto_lambda"]["layers.0.mlp.up_proj.weight"]
        if method == "task-arithmetic":
            torch.testing.assert_close(merged, mean)
            assert chosen == pytest.approx(1 / 3)
        else:  # the direction is iso-c's own: its flat spectrum, scaled
            u, s, vh = torch.linalg.svd(sum(taus).double(), full_matrices=False)
            torch.testing.assert_close(merged.double(), chosen * s.mean() * u @ vh, rtol=1e-5, atol=1e-6)
        assert record["config"]["params"]["lam"] == "auto"
        assert "lambda: auto" in (out / "weightlab_merge.yml").read_text()


@pytest.mark.parametrize("weights", [(1.0, -0.5, 0.25), (-1.0, -1.0, 0.5), (1.0, -1.0, 0.0)])
def test_auto_lambda_with_negative_weights_takes_the_length_of_the_weighted_mean(weights, tmp_path, run_cli):
    """A subtracted task counts by its size: λ = ‖Σ c_iτ_i‖/(Σ|c_i|·‖Δ‖), so task arithmetic is
    Σ c_iτ_i/Σ|c_i| (positive λ, the update's sign kept), also where Σ c_i is 0 or negative."""
    gen = torch.Generator().manual_seed(2)
    taus = [torch.randn(4, 6, generator=gen) for _ in range(3)]
    folders = _planted(tmp_path, taus)
    out = tmp_path / "out"
    code, _, err = run_cli(
        "merge",
        "--method",
        "task-arithmetic",
        "--base",
        folders[0],
        *folders[1:],
        "--weights",
        ",".join(map(str, weights)),
        "--lambda",
        "auto",
        "-o",
        out,
    )
    assert code == 0, err
    merged = load_file(out / "model.safetensors")["layers.0.mlp.up_proj.weight"]
    total = sum(abs(w) for w in weights)
    torch.testing.assert_close(merged, sum(w * t for w, t in zip(weights, taus)) / total)
    record = json.loads((out / "weightlab_merge.json").read_text())
    assert record["auto_lambda"]["layers.0.mlp.up_proj.weight"] == pytest.approx(1 / total)


def test_auto_lambda_is_refused_where_lambda_scales_no_update_of_the_base(tmp_path, run_cli):
    p = _two(tmp_path)
    for method in ("cart", "average", "model-stock"):
        base = ["--base", p["base"]] if METHODS[method].needs_base else []
        code, _, err = run_cli(
            "merge", "--method", method, *base, p["a"], p["b"], "--lambda", "auto", "-o", tmp_path / "x"
        )
        assert code == 2 and "has none to scale" in err, err
    code, _, err = run_cli(
        "merge", "--method", "ties", "--base", p["base"], p["a"], "--lambda", "half", "-o", tmp_path / "x"
    )
    assert code == 2 and "give a number, or auto" in err
    assert not (tmp_path / "x").exists()
