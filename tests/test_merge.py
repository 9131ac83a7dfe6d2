"""Merging: each method against a plain reference of its paper's formula, identities, NAN by hand,
determinism, loadable output, and the error rules."""

from __future__ import annotations

import contextlib
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from weightlab.errors import InvalidArgument, MissingTensor, OutputExists, ShapeMismatch
from weightlab.io import open_checkpoint
from weightlab.merging import METHODS, NanOptions, merge, nan_coefficients
from weightlab.merging.config import build_config
from weightlab.merging.recipes import load_config
from weightlab.merging.run import tensor_seed


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def call(method, base, models, coeffs, seed=0, name="w", **params):
    gen = lambda i: torch.Generator().manual_seed(tensor_seed(seed, name, i))
    spec = METHODS[method]
    given = {("lambda" if k == "lam" else k): v for k, v in params.items()}
    given = {k: v for k, v in given.items() if spec.param(k)}  # the ones it declares
    return spec.fn(base, models, torch.tensor(coeffs, dtype=torch.float64), spec.resolve(given), gen)


# --- plain references, entry by entry, from the papers' formulas -----------------------------


def ref_ties(base, models, coeffs, density, lam):
    b = base.numpy().ravel()
    taus = []
    for m in models:
        tau = m.numpy().ravel() - b
        k = max(1, int(density * tau.size)) if density < 1 else tau.size  # at least one (mergekit's rule)
        keep = np.argsort(-np.abs(tau), kind="stable")[:k]
        trimmed = np.zeros_like(tau)
        trimmed[keep] = tau[keep]
        taus.append(trimmed)
    out = np.zeros_like(b)
    for j in range(b.size):
        s = sum(c * t[j] for c, t in zip(coeffs, taus))
        sign = 1.0 if s >= 0 else -1.0  # a sum of 0 elects +
        num = sum(c * t[j] for c, t in zip(coeffs, taus) if t[j] != 0 and np.sign(t[j]) == sign)
        den = sum(c for c, t in zip(coeffs, taus) if t[j] != 0 and np.sign(t[j]) == sign)
        out[j] = num / den if den else 0.0
    return (b + lam * out).reshape(base.shape)


def test_task_arithmetic_and_average_follow_their_formulas():
    base, a, b = rand(5, 4), rand(5, 4, seed=1), rand(5, 4, seed=2)
    got = call("task-arithmetic", base, [a, b], [0.7, 0.2], lam=0.5)
    torch.testing.assert_close(got, base + 0.5 * (0.7 * (a - base) + 0.2 * (b - base)))
    torch.testing.assert_close(call("average", None, [a, b], [3.0, 1.0]), (3 * a + b) / 4)


def test_ties_equals_the_plain_reference():
    base = rand(6, 5)
    models = [base + rand(6, 5, seed=s) for s in (1, 2, 3)]
    got = call("ties", base, models, [1.0, 0.5, 2.0], density=0.4, lam=0.8)
    np.testing.assert_allclose(got.numpy(), ref_ties(base, models, [1.0, 0.5, 2.0], 0.4, 0.8), atol=1e-12)


def test_ties_at_density_one_with_agreeing_signs_is_the_mean():
    base = rand(4, 4)
    step = rand(4, 4, seed=9).abs()
    models = [base + step * f for f in (0.5, 1.0, 3.0)]
    got = call("ties", base, models, [1.0, 1.0, 1.0], density=1.0)
    torch.testing.assert_close(got, torch.stack(models).mean(0))


def test_dare_keeps_each_entry_with_probability_density_and_rescales():
    base, model = torch.zeros(200, 200, dtype=torch.float64), torch.ones(200, 200, dtype=torch.float64)
    got = call("dare-linear", base, [model], [1.0], density=0.3)
    kept = got != 0
    assert abs(float(kept.double().mean()) - 0.3) < 0.01
    assert torch.all(got[kept] == 1 / 0.3)
    mask = torch.bernoulli(torch.full((200, 200), 0.3), generator=torch.Generator().manual_seed(tensor_seed(0, "w", 0)))
    assert torch.equal(kept, mask.bool())


def test_dare_at_density_one_is_task_arithmetic():
    base = rand(5, 5)
    models = [base + rand(5, 5, seed=s) for s in (1, 2)]
    torch.testing.assert_close(
        call("dare-linear", base, models, [0.3, 0.6], density=1.0, lam=0.9),
        call("task-arithmetic", base, models, [0.3, 0.6], lam=0.9),
    )
    torch.testing.assert_close(
        call("dare-ties", base, models, [0.3, 0.6], density=1.0), call("ties", base, models, [0.3, 0.6], density=1.0)
    )


def test_breadcrumbs_drops_the_largest_gamma_and_the_smallest():
    base = torch.zeros(100, dtype=torch.float64)
    model = torch.arange(1, 101, dtype=torch.float64) * torch.tensor([1.0, -1.0]).repeat(50)
    got = call("breadcrumbs", base, [model], [1.0], density=0.5, gamma=0.1)
    kept = sorted(int(i) + 1 for i in torch.nonzero(got).flatten())
    assert kept == list(range(41, 91))  # magnitudes 41..90: the top 10 and the bottom 40 dropped
    assert torch.equal(got[got != 0], model[got != 0])


def test_slerp_follows_the_great_circle_and_falls_back_to_lerp():
    a = torch.tensor([1.0, 0.0], dtype=torch.float64)
    b = torch.tensor([0.0, 2.0], dtype=torch.float64)
    got = call("slerp", None, [a, b], [1.0, 1.0], t=1 / 3)
    omega = math.pi / 2
    expected = (math.sin(2 * omega / 3) * a + math.sin(omega / 3) * b) / math.sin(omega)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(call("slerp", None, [a, 3 * a], [1, 1], t=0.25), 1.5 * a)


def test_model_stock_interpolates_with_its_ratio():
    base = torch.zeros(2, dtype=torch.float64)
    a, b = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    c = torch.tensor([1.0, 1.0], dtype=torch.float64) / math.sqrt(2)
    cos = (0 + 1 / math.sqrt(2) + 1 / math.sqrt(2)) / 3
    t = 3 * cos / (1 + 2 * cos)
    torch.testing.assert_close(call("model-stock", base, [a, b, c], [1, 1, 1]), t * (a + b + c) / 3)
    huge = [1e30 * x for x in (a, b, c)]  # dot products beyond float32: the ratio depends on angles alone
    got = call("model-stock", base.float(), [x.float() for x in huge], [1, 1, 1])
    torch.testing.assert_close(got, (t * sum(huge) / 3).float())


def test_tsv_equals_a_plain_reference():
    base = rand(8, 6)
    models = [base + rand(8, 6, seed=s) for s in (1, 2, 3)]
    got = call("tsv", base, models, [1.0, 1.0, 1.0], lam=1.0)
    us, ss, vs = [], [], []
    for m in models:
        u, s, vt = np.linalg.svd((m - base).numpy(), full_matrices=False)
        us.append(u[:, :2]), ss.append(s[:2]), vs.append(vt[:2].T)  # keep 6 // 3 = 2 each
    u, s, v = np.hstack(us), np.concatenate(ss), np.hstack(vs)
    pu, _, qu = np.linalg.svd(u, full_matrices=False)
    pv, _, qv = np.linalg.svd(v, full_matrices=False)
    expected = base.numpy() + (pu @ qu) @ np.diag(s) @ (pv @ qv).T
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-10)


@pytest.mark.parametrize("method", ["average", "task-arithmetic", "ties", "dare-linear", "dare-ties", "nan", "tsv"])
def test_one_model_with_weight_one_is_returned(method):
    base, model = rand(6, 6), rand(6, 6, seed=4)
    got = call(method, base, [model], [1.0], density=1.0)
    torch.testing.assert_close(got, model)


def test_nan_coefficients_by_hand():
    # norms 1, 2, 4 -> inverse 1, 0.5, 0.25 -> sum 1.75
    assert nan_coefficients([1.0, 2.0, 4.0]) == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    assert nan_coefficients([1.0, 2.0, 4.0], normalize="count") == pytest.approx([12 / 7, 6 / 7, 3 / 7])
    assert nan_coefficients([1.0, 2.0, 4.0], power=2) == pytest.approx([16 / 21, 4 / 21, 1 / 21])
    assert nan_coefficients([3.0, 3.0, 3.0]) == pytest.approx([1 / 3] * 3)


def _write(path, tensors):
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "model.safetensors")
    return path


@pytest.fixture()
def three(tmp_path):
    """A base and three fine-tunes: weights of norms in ratio 1:2:4 and an int buffer."""
    base = {
        "layers.0.mlp.up_proj.weight": rand(8, 4),
        "layers.1.mlp.up_proj.weight": rand(8, 4, seed=1),
        "position_ids": torch.arange(6),
    }
    paths = {"base": _write(tmp_path / "base", base)}
    for i, scale in enumerate((1.0, 2.0, 4.0)):
        ft = {k: (v * scale if v.is_floating_point() else v) for k, v in base.items()}
        paths[f"ft{i}"] = _write(tmp_path / f"ft{i}", ft)
    return paths


def test_nan_merge_uses_inverse_norm_coefficients_per_tensor(three, tmp_path):
    cfg = build_config(
        {"method": "nan", "base": str(three["base"]), "models": [str(three[f"ft{i}"]) for i in range(3)]}
    )
    report = merge(cfg, tmp_path / "out")
    for cs in report.per_tensor.values():
        assert cs == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    out = open_checkpoint(tmp_path / "out")
    base = open_checkpoint(three["base"])
    w = base.get("layers.0.mlp.up_proj.weight")
    # θ_b + Σ c_i (s_i − 1) θ_b with s = 1, 2, 4
    torch.testing.assert_close(out.get("layers.0.mlp.up_proj.weight"), w + (2 / 7 * 1 + 1 / 7 * 3) * w)
    assert torch.equal(out.get("position_ids"), torch.arange(6))
    record = json.loads((tmp_path / "out" / "weightlab_merge.json").read_text())
    assert record["config"]["coeff"] == "nan" and record["copied_from_base"] == ["position_ids"]
    assert record["coefficients_per_layer"]["0"] == pytest.approx([4 / 7, 2 / 7, 1 / 7])


def test_nan_model_granularity_and_task_vector_norms(three, tmp_path):
    models = [str(three[f"ft{i}"]) for i in range(3)]
    cfg = build_config(
        {
            "method": "ties",
            "coeff": "nan",
            "base": str(three["base"]),
            "models": models,
            "nan": NanOptions(norm_of="task-vectors", granularity="model"),
            "param_values": {"density": 0.5},
        }
    )
    report = merge(cfg, tmp_path / "out")
    # task vectors are 0·θ_b, 1·θ_b, 3·θ_b: the zero one carries no information, the limit gives it all weight
    assert report.coefficients == pytest.approx([1.0, 0.0, 0.0]) and not report.per_tensor


def test_same_inputs_and_seed_give_identical_bytes(three, tmp_path):
    models = [str(three[f"ft{i}"]) for i in range(3)]
    for run in ("a", "b", "c"):
        seed = 1 if run == "c" else 0
        merge(
            build_config(
                {
                    "method": "dare-ties",
                    "base": str(three["base"]),
                    "models": models,
                    "seed": seed,
                    "param_values": {"density": 0.5},
                }
            ),
            tmp_path / run,
        )
    for f in ("model.safetensors", "weightlab_merge.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    assert (tmp_path / "a" / "model.safetensors").read_bytes() != (tmp_path / "c" / "model.safetensors").read_bytes()


def test_merged_tiny_llama_loads_in_transformers_with_base_dtype(zoo, tmp_path):
    from transformers import AutoModel

    cfg = build_config(
        {
            "method": "ties",
            "base": str(zoo["llama"]),
            "models": [str(zoo["llama_ft"]), str(zoo["llama_ft"])],
            "param_values": {"density": 0.5},
        }
    )
    merge(cfg, tmp_path / "m", shard_size="40KB")
    assert (tmp_path / "m" / "model.safetensors.index.json").exists() and (tmp_path / "m" / "config.json").exists()
    model = AutoModel.from_pretrained(tmp_path / "m")
    assert model.layers[0].self_attn.q_proj.weight.dtype == torch.float32


def test_resized_vocabulary_is_a_clear_shape_error(three, tmp_path):
    bad = {
        "layers.0.mlp.up_proj.weight": rand(9, 4),
        "layers.1.mlp.up_proj.weight": rand(8, 4),
        "position_ids": torch.arange(6),
    }
    _write(tmp_path / "bad", bad)
    cfg = build_config({"method": "task-arithmetic", "base": str(three["base"]), "models": [str(tmp_path / "bad")]})
    with pytest.raises(ShapeMismatch, match=r"\[9, 4\]"):
        merge(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tensor_missing_from_a_model_is_an_error(three, tmp_path):
    _write(tmp_path / "partial", {"layers.0.mlp.up_proj.weight": rand(8, 4), "position_ids": torch.arange(6)})
    cfg = build_config({"method": "task-arithmetic", "base": str(three["base"]), "models": [str(tmp_path / "partial")]})
    with pytest.raises(MissingTensor, match=r"layers\.1\.mlp\.up_proj\.weight"):
        merge(cfg, tmp_path / "out")


@pytest.mark.parametrize(
    "options, message",
    [
        (
            {"method": "task-arithmetic", "models": ["a"], "param_values": {"density": 0.5}, "base": "b"},
            "task-arithmetic does not use density \\(its parameters: lambda, normalize\\)",
        ),
        ({"method": "ties", "models": ["a", "b"]}, "needs --base"),
        ({"method": "slerp", "models": ["a", "b", "c"]}, "merges 2 models"),
        ({"method": "nan", "models": ["a"], "base": "b", "weights": [1.0]}, "use one"),
        ({"method": "frobnicate", "models": ["a"]}, "must be one of"),
        ({"method": "ties", "models": ["a"], "base": "b", "param_values": {"density": 1.5}}, "density"),
    ],
)
def test_invalid_configs_are_refused(options, message):
    with pytest.raises(InvalidArgument, match=message):
        build_config(options)


def test_yaml_config_rejects_unknown_keys_and_reads_mergekit(tmp_path):
    (tmp_path / "ours.yml").write_text("method: ties\nbase: b\nmodels: [x, y]\ndensty: 0.5\n")
    with pytest.raises(InvalidArgument, match="densty"):
        load_config(tmp_path / "ours.yml")
    (tmp_path / "mk.yml").write_text(
        "merge_method: ties\nbase_model: base\nmodels:\n  - model: base\n"
        "  - model: a\n    parameters: {weight: 0.7, density: 0.4}\n"
        "  - model: b\n    parameters: {weight: 0.3, density: 0.4}\n"
        "parameters: {normalize: true, int8_mask: true}\ndtype: bfloat16\n"
    )
    cfg = build_config(load_config(tmp_path / "mk.yml"))
    assert (cfg.method, cfg.base, cfg.models, cfg.weights, cfg.resolved.density, cfg.dtype) == (
        "ties",
        "base",
        ["a", "b"],
        [0.7, 0.3],
        0.4,
        "bfloat16",
    )


def test_cli_merge_prints_coefficients_and_refuses_to_overwrite(three, run_cli, tmp_path):
    args = [
        "merge",
        "--method",
        "nan",
        "--base",
        three["base"],
        three["ft0"],
        three["ft1"],
        three["ft2"],
        "-o",
        tmp_path / "m",
    ]
    code, out, err = run_cli(*args)
    assert code == 0, err
    assert "NAN coefficients" in out and "0.571" in out
    code, _, err = run_cli(*args)
    assert code == 2 and "--force" in err
    code, _, err = run_cli(
        "merge", "--method", "ties", "--base", three["base"], three["ft0"], "--gamma", "0.1", "-o", tmp_path / "x"
    )
    assert code == 2 and "ties does not use gamma" in err and not (tmp_path / "x").exists()


def test_existing_output_is_not_touched_without_force(three, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    cfg = build_config({"method": "average", "models": [str(three["ft0"]), str(three["ft1"])]})
    with pytest.raises(OutputExists):
        merge(cfg, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_kth_largest_is_exact_on_large_tensors_with_ties():
    from weightlab.compute.trim import kth_largest

    x = torch.randn(1_000_003, generator=torch.Generator().manual_seed(0)).abs()
    x[::7] = 0.5  # many exact ties near the middle
    for k in (1, 1000, 300_000, 500_000, 999_999):
        assert kth_largest(x, k) == torch.kthvalue(x, x.numel() - k + 1).values, k


def test_ties_trim_keeps_exactly_k_on_large_tensors():
    from weightlab.compute.trim import trim_top_magnitude

    tau = torch.randn(700, 900, generator=torch.Generator().manual_seed(1))
    tau[::3, ::5] = 0.25
    kept = trim_top_magnitude(tau, 0.3)
    assert int((kept != 0).sum()) == int(0.3 * tau.numel())
    assert float(kept.abs()[kept != 0].min()) >= float(tau.abs()[kept == 0].max())


def test_chunked_ties_is_bit_identical_to_trimming_whole_task_vectors():
    from weightlab.compute.trim import trim_top_magnitude
    from weightlab.merging.ties import TIES_CHUNK, elect_and_mean

    gen = torch.Generator().manual_seed(3)
    base = torch.randn(3 * TIES_CHUNK + 17, generator=gen)
    models = [base + torch.randn(base.shape, generator=gen).round(decimals=1) * 0.1 for _ in range(3)]  # many ties
    coeffs = torch.tensor([0.5, 0.3, 0.2])
    for density in (0.2, 0.5, 1.0):
        whole = base + 0.9 * elect_and_mean([trim_top_magnitude(m - base, density) for m in models], coeffs)
        spec = METHODS["ties"]
        chunked = spec.fn(base, models, coeffs, spec.resolve({"density": density, "lambda": 0.9}), None)
        assert torch.equal(chunked, whole), density


def test_ties_in_place_arithmetic_is_bit_identical_to_the_plain_torch_formula():
    """The blocks trim by hard shrinkage, vote with clamps and signs and divide 0/0 to NaN then 0,
    all in reused buffers: the same bits as masks and `torch.where`, with ties at the threshold,
    a model whose coefficient is 0 and entries where no model agrees."""
    from weightlab.compute.scratch import reusing_buffers
    from weightlab.compute.trim import trim_threshold

    gen = torch.Generator().manual_seed(5)
    base = torch.randn(2100, 128, generator=gen)  # two chunks and a bit (TIES_CHUNK)
    models = [base + (torch.randn(base.shape, generator=gen) * 8).round() / 64 for _ in range(3)]
    models[2][:10] = base[:10]  # a block where one model does not move
    coeffs = torch.tensor([0.5, 0.0, 1.5])
    density, lam = 0.3, 0.7

    def plain(tau):
        t, ties = trim_threshold(tau, density)
        keep = tau.abs() > t
        keep.view(-1)[torch.nonzero(tau.abs().view(-1) == t).flatten()[:ties]] = True
        return torch.where(keep, tau, 0.0)

    taus = [plain(m - base) for m in models]
    elected = torch.where(sum(c * t for c, t in zip(coeffs.tolist(), taus)) >= 0, 1.0, -1.0)
    merged, divisor = torch.zeros_like(base), torch.zeros_like(base)
    for c, tau in zip(coeffs.tolist(), taus):
        agree = tau * elected > 0
        merged.add_(torch.where(agree, tau, 0.0), alpha=c)
        divisor.add_(agree.to(divisor.dtype), alpha=c)
    expected = base + lam * torch.where(divisor != 0, merged / torch.where(divisor != 0, divisor, 1.0), 0.0)
    spec = METHODS["ties"]
    for pooled in (False, True):
        with reusing_buffers() if pooled else contextlib.nullcontext():
            got = spec.fn(base, models, coeffs, spec.resolve({"density": density, "lambda": lam}), None)
        assert torch.equal(got.view(torch.int32), expected.view(torch.int32)), pooled


@pytest.mark.parametrize("method", [m for m in METHODS if not METHODS[m].calibration])
@pytest.mark.parametrize("shape", [(0, 8), (8, 0), (0,)])
def test_every_method_merges_an_empty_tensor(method, shape):
    """A zero-size tensor (an empty buffer, a pruned head) merges to an empty tensor of its shape;
    TIES used to divide its span by zero."""
    base = torch.zeros(shape)
    models = [torch.zeros(shape), torch.zeros(shape)]
    spec = METHODS[method]
    params = {"t": 0.5} if method in ("slerp", "nearswap") else {}
    models = models[: spec.max_models or 2]
    merged = call(method, None if spec.optional_base else base, models, [1.0] * len(models), **params)
    assert merged.shape == base.shape
