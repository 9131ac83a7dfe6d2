"""mergekit's recipes run as mergekit runs them. Each recipe here is mergekit's own format (its
`examples/*.yml`, one recipe per method), on tiny Llama-shaped models; the expected tensors come
from mergekit's formulas re-derived in small plain numpy below (settings, sparsification, TIES'
consensus, SLERP, …), never from weightlab's code. The benchmark (`benchmarks/bench_mergekit.py`)
runs mergekit 0.1.5 itself on the same recipes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from weightlab import synthetic
from weightlab.errors import WeightlabError
from weightlab.merging.config import build_config
from weightlab.merging.recipes import load_config

LAYERS = 4


@pytest.fixture(scope="module")
def zoo4(tmp_path_factory):
    """A base and three brief fine-tunes of a 4-layer tiny Llama, with tokenizers."""
    root = tmp_path_factory.mktemp("mergekit")
    paths = {}
    for name, seed in (("base", 0), ("a", 1), ("b", 2), ("c", 3)):
        model = synthetic.tiny_model("llama", seed=0, layers=LAYERS, causal_lm=True)
        if seed:
            model = synthetic.finetune(model, steps=3, seed=seed)
        paths[name] = synthetic.save(model, root / name)
        synthetic.tiny_tokenizer(paths[name])
    return root, {k: str(v) for k, v in paths.items()}


def tensors(folder) -> dict[str, np.ndarray]:
    return {k: v.double().numpy() for k, v in load_file(f"{folder}/model.safetensors").items()}


def run(run_cli, tmp_path, recipe: dict, name: str = "out"):
    (tmp_path / f"{name}.yml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    code, _, err = run_cli("merge", "--config", tmp_path / f"{name}.yml", "-o", tmp_path / name)
    assert code == 0, err
    return tensors(tmp_path / name)


# ---- mergekit's formulas, re-derived -------------------------------------------------------


def evaluate(setting, name: str, t: float):
    """mergekit's evaluate_setting: a value; a gradient (numbers interpolated at t, else picked);
    conditions, the first whose filter is in the name."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list) and setting and isinstance(setting[0], dict):
        for cond in setting:
            if cond.get("filter") in (None, "*") or cond["filter"] in name:
                return evaluate(cond["value"], name, t)
        return None
    if isinstance(setting, list):
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting):
            return setting[int(t * (len(setting) - 1))]
        x = t * (len(setting) - 1)
        lo = math.floor(x)
        hi = min(len(setting) - 1, lo + 1)
        return (1 - (x - lo)) * setting[lo] + (x - lo) * setting[hi]
    return setting


def t_of(name: str, layers: int = LAYERS) -> float:
    parts = name.split(".")
    if "layers" not in parts:
        return 0.0
    return int(parts[parts.index("layers") + 1]) / (layers - 1)


def tv(model, base):
    """τ = θ − θ_b as the maths computes it, in float32 (a selection by magnitude then sees the same ties)."""
    return (model.astype(np.float32) - base.astype(np.float32)).astype(np.float64)


def magnitude(tau, density):
    """Keep the k = max(1, int(density·n)) largest |τ| (mergekit's `magnitude`)."""
    if density >= 1:
        return tau
    flat = tau.ravel()
    k = max(1, int(density * flat.size))
    keep = np.zeros(flat.size, bool)
    keep[np.argsort(-np.abs(flat), kind="stable")[:k]] = True
    return np.where(keep, flat, 0).reshape(tau.shape)


def outliers(tau, density, gamma):
    """mergekit's magnitude_outliers: drop the γ·n largest and the smallest, keeping density·n."""
    if density >= 1:
        return tau
    flat = tau.ravel()
    n = flat.size
    keep_n, top = int(density * n), int(gamma * n)
    bottom = max(0, n - keep_n - top)
    keep = np.zeros(n, bool)
    keep[np.argsort(np.abs(flat), kind="stable")[bottom : bottom + keep_n]] = True
    return np.where(keep, flat, 0).reshape(tau.shape)


def gta(base, models, weights, taus, consensus: bool, normalize: bool, lam: float = 1.0):
    """mergekit's generalized task arithmetic on given (sparsified) task vectors."""
    deltas = np.stack([w * tau for w, tau in zip(weights, taus)])
    w = np.array(weights).reshape(-1, *([1] * base.ndim))
    if consensus:
        elected = np.where(deltas.sum(0) >= 0, 1.0, -1.0)
        mask = np.sign(deltas) == elected
        mixed = (deltas * mask).sum(0)
        divisor = (w * mask).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(0)
        divisor = np.full_like(mixed, w.sum())
        divisor[np.abs(divisor) < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    return base + lam * mixed


def slerp(t, a, b):
    """mergekit's slerp of two whole tensors (linear where |cos| > 0.9995)."""
    x, y = a.ravel(), b.ravel()
    na, nb = np.linalg.norm(x), np.linalg.norm(y)
    dot = np.clip(np.dot(x / (na if na > 1e-8 else 1), y / (nb if nb > 1e-8 else 1)), -1, 1)
    if abs(dot) > 0.9995:
        return (1 - t) * a + t * b
    theta = np.arccos(dot)
    return (np.sin((1 - t) * theta) * a + np.sin(t * theta) * b) / np.sin(theta)


def close(got: dict, want: dict, atol=2e-6):
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=atol, rtol=1e-5, err_msg=name)


# ---- the settings ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "setting, name, t, want",
    [
        (0.5, "x", 0.3, 0.5),
        ([0, 0.3, 0.7, 1], "x", 1 / 3, 0.3),
        ([1, 0.7, 0.1], "x", 1 / 3, 1 - 2 / 3 * 0.3),
        ([1, 0.7, 0.1], "x", 1.0, 0.1),
        ([0.2], "x", 0.7, 0.2),
        ([True, False], "x", 0.4, True),
        ([{"filter": "mlp", "value": 0.5}, {"value": 0}], "model.layers.1.mlp.up_proj.weight", 0.2, 0.5),
        ([{"filter": "mlp", "value": 0.5}, {"value": 0}], "model.layers.1.self_attn.q_proj.weight", 0.2, 0),
        ([{"filter": "self_attn", "value": [0, 1]}], "model.layers.1.self_attn.q_proj.weight", 0.25, 0.25),
        ([{"filter": "mlp", "value": 0.5}], "lm_head.weight", 0.0, None),
        ({"filter": "*", "value": 3}, "anything", 0.0, 3),
    ],
)
def test_settings_evaluate_as_mergekits_evaluate_setting(setting, name, t, want):
    from weightlab.merging.settings import evaluate, parse

    got = evaluate(parse(setting, "p"), name, t)
    assert got == pytest.approx(want) if want is not None else got is None


# ---- mergekit's own examples (examples/*.yml), paths and layer ranges scaled to the tiny models ----


def test_example_linear(zoo4, run_cli, tmp_path):
    _, p = zoo4
    weights = {"a": 1.0, "b": 0.3, "c": 0.5}
    recipe = {
        "models": [{"model": p[k], "parameters": {"weight": w}} for k, w in weights.items()],
        "merge_method": "linear",
        "dtype": "float32",
    }
    got = run(run_cli, tmp_path, recipe)
    inputs = {k: tensors(p[k]) for k in weights}
    total = sum(weights.values())
    close(got, {n: sum(w * inputs[k][n] for k, w in weights.items()) / total for n in inputs["a"]})


TIES_EXAMPLE = {  # examples/ties.yml
    "a": {"density": [1, 0.7, 0.1], "weight": 1.0},
    "b": {"density": 0.5, "weight": [0, 0.3, 0.7, 1]},
    "c": {"density": 0.33, "weight": [{"filter": "mlp", "value": 0.5}, {"value": 0}]},
}


def test_example_ties_with_gradients_filters_and_per_model_densities(zoo4, run_cli, tmp_path):
    _, p = zoo4
    recipe = {
        "models": [{"model": p[k], "parameters": v} for k, v in TIES_EXAMPLE.items()],
        "merge_method": "ties",
        "base_model": p["base"],
        "parameters": {"normalize": True, "int8_mask": True},
        "dtype": "float32",
    }
    got = run(run_cli, tmp_path, recipe)
    base, inputs = tensors(p["base"]), {k: tensors(p[k]) for k in TIES_EXAMPLE}
    want = {}
    for n in base:
        t = t_of(n)
        ws = [evaluate(v["weight"], n, t) for v in TIES_EXAMPLE.values()]
        taus = [magnitude(tv(inputs[k][n], base[n]), evaluate(v["density"], n, t)) for k, v in TIES_EXAMPLE.items()]
        want[n] = gta(base[n], None, ws, taus, consensus=True, normalize=True)
    close(got, want)


def test_example_bio_merge_ties_without_normalizing(zoo4, run_cli, tmp_path):
    _, p = zoo4
    recipe = {
        "models": [{"model": p[k], "parameters": {"density": 0.5, "weight": 0.5}} for k in "ab"],
        "merge_method": "ties",
        "base_model": p["base"],
        "parameters": {"normalize": False, "int8_mask": True},
        "dtype": "float16",
    }
    got = run(run_cli, tmp_path, recipe)
    base, inputs = tensors(p["base"]), {k: tensors(p[k]) for k in "ab"}
    want = {
        n: gta(base[n], None, [0.5, 0.5], [magnitude(tv(inputs[k][n], base[n]), 0.5) for k in "ab"], True, False)
        for n in base
    }
    close(got, {n: w.astype(np.float16).astype(np.float64) for n, w in want.items()}, atol=2e-3)
    assert all(v.dtype == torch.float16 for v in load_file(tmp_path / "out" / "model.safetensors").values())


def test_example_gradient_slerp_over_a_slice(zoo4, run_cli, tmp_path):
    _, p = zoo4
    t = [
        {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
        {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
        {"value": 0.5},
    ]
    recipe = {
        "slices": [
            {"sources": [{"model": p["a"], "layer_range": [0, LAYERS]}, {"model": p["b"], "layer_range": [0, LAYERS]}]}
        ],
        "merge_method": "slerp",
        "base_model": p["a"],
        "parameters": {"t": t},
        "dtype": "float32",
    }
    got = run(run_cli, tmp_path, recipe)
    a, b = tensors(p["a"]), tensors(p["b"])
    close(got, {n: slerp(evaluate(t, n, t_of(n)), a[n], b[n]) for n in a})


def test_example_frankenmerge_stacks_layers_and_transformers_runs_it(zoo4, run_cli, tmp_path):
    """orcamini-platy-44layer.yml: layers 0-2 of one model, then 1-3 of another, six in all; the
    embeddings come from the first slice's model, the final norm and head from the last's."""
    from transformers import AutoModelForCausalLM

    _, p = zoo4
    recipe = {
        "slices": [
            {"sources": [{"model": p["a"], "layer_range": [0, 3]}]},
            {"sources": [{"model": p["b"], "layer_range": [1, 4]}]},
        ],
        "merge_method": "passthrough",
        "dtype": "float32",
    }
    got = run(run_cli, tmp_path, recipe)
    a, b = tensors(p["a"]), tensors(p["b"])
    layer_of = {0: ("a", 0), 1: ("a", 1), 2: ("a", 2), 3: ("b", 1), 4: ("b", 2), 5: ("b", 3)}
    want = {
        "model.embed_tokens.weight": a["model.embed_tokens.weight"],
        "model.norm.weight": b["model.norm.weight"],
        "lm_head.weight": b["lm_head.weight"],
    }
    for out, (model, layer) in layer_of.items():
        source = a if model == "a" else b
        for n in source:
            if f".layers.{layer}." in n:
                want[n.replace(f".layers.{layer}.", f".layers.{out}.")] = source[n]
    close(got, want, atol=0)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 6
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    stacked = synthetic.tiny_model("llama", seed=0, layers=6, causal_lm=True).eval()
    stacked.load_state_dict({n: torch.from_numpy(v).float() for n, v in want.items()})
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, stacked(ids).logits)


def importance(base, other):
    """Arcee Fusion's: |θ − θ_b| times KL(softmax θ ‖ softmax θ_b) along the last axis, in float32
    (torch's softmax: an entry at the fence falls on the side the maths' rounding puts it)."""
    x, y = torch.from_numpy(base).float(), torch.from_numpy(other).float()
    p, q = torch.softmax(y, -1) + 1e-8, torch.softmax(x, -1) + 1e-8
    return ((y - x).abs() * (p * torch.log(p / q)).sum(-1, keepdim=True)).numpy()


def test_example_arcee_fusion(zoo4, run_cli, tmp_path):
    _, p = zoo4
    recipe = {
        "models": [{"model": p["a"]}, {"model": p["b"]}],
        "merge_method": "arcee_fusion",
        "base_model": p["a"],
        "dtype": "float32",
    }
    got = run(run_cli, tmp_path, recipe)
    a, b = tensors(p["a"]), tensors(p["b"])
    want = {}
    for n in a:
        score = importance(a[n], b[n])
        ordered = np.sort(score.ravel())
        q1, med, q3 = (ordered[int(q * (ordered.size - 1))] for q in (0.25, 0.5, 0.75))
        want[n] = a[n] + (b[n] - a[n]) * (score >= med + 1.5 * (q3 - q1))
    close(got, want, atol=1e-6)


# ---- one recipe per mergekit method, against its formula -------------------------------------


def unit(x):
    n = np.linalg.norm(x.ravel())
    return x / n if n > 0 else x * 0


def ref_nuslerp(t, a, b, row_wise, flatten):
    shape = a.shape
    if flatten:
        a, b = a.reshape(1, -1), b.reshape(1, -1)
    elif row_wise and a.ndim > 1:
        a, b = a.T, b.T
    else:
        a, b = a.reshape(-1, shape[-1]), b.reshape(-1, shape[-1])
    out = np.empty_like(a)
    for i in range(a.shape[0]):
        x, y = a[i], b[i]
        cos = np.clip(np.dot(x / max(np.linalg.norm(x), 1e-7), y / max(np.linalg.norm(y), 1e-7)), -1, 1)
        if 1 - cos**2 <= 1e-16:
            out[i] = (1 - t) * x + t * y
        else:
            th = np.arccos(cos)
            out[i] = (np.sin((1 - t) * th) * x + np.sin(t * th) * y) / np.sin(th)
    if row_wise and not flatten and len(shape) > 1:
        out = out.T
    return out.reshape(shape)


def ref_multislerp(taus, weights):
    w = np.array(weights) / sum(weights)
    flat = np.stack([t.ravel() for t in taus])
    norms = np.linalg.norm(flat, axis=1)
    if not norms.any():
        return np.zeros_like(taus[0])
    units = flat / (norms[:, None] + 1e-8)
    mean = (units * w[:, None]).sum(0)
    mean /= np.linalg.norm(mean)
    tangents = units - (units @ mean)[:, None] * mean
    step = (tangents * w[:, None]).sum(0)
    length = np.linalg.norm(step) + 1e-8
    out = mean * np.cos(length) + step * np.sin(length) / length
    return (out * (norms * w).sum()).reshape(taus[0].shape)


def ref_karcher(xs, iters=10, tol=1e-5):
    norms = [np.linalg.norm(x) for x in xs]
    units = [x / n for x, n in zip(xs, norms) if n > tol]
    if not units:
        return np.zeros_like(xs[0])
    mean = unit(sum(units) / len(units))
    for _ in range(iters):
        tangent = np.zeros_like(mean)
        for u in units:
            dot = np.clip(np.sum(mean * u), -1, 1)
            th = np.arccos(dot)
            if th >= tol:
                tangent += (th / np.sin(th)) * (u - dot * mean) / len(units)
        length = np.linalg.norm(tangent)
        if length < tol:
            break
        mean = unit(np.cos(length) * mean + np.sin(length) * tangent / length)
    return sum(norms) / len(xs) * mean


def ref_model_stock(base, models, filter_wise):
    rows = filter_wise and base.ndim > 1
    taus = [(m - base).reshape(base.shape[0], -1) if rows else (m - base).reshape(1, -1) for m in models]
    n = len(taus)
    cos = np.mean(
        [[np.dot(unit(x), unit(y)) for x, y in zip(taus[i], taus[j])] for i in range(n) for j in range(i + 1, n)], 0
    )
    denominator = 1 + (n - 1) * cos
    t = np.where(np.abs(denominator) < 1e-6, 0.0, n * cos / np.where(np.abs(denominator) < 1e-6, 1, denominator))
    t = t.reshape(-1, *([1] * (base.ndim - 1))) if rows else t.item()
    return t * np.mean(models, 0) + (1 - t) * base


def ref_sce(base, models, topk):
    taus = np.stack([tv(m, base) for m in models])
    if topk < 1:
        var = taus.var(0)
        k = int(np.count_nonzero(var) * topk)
        keep = np.zeros(var.size, bool)
        keep[np.argsort(-np.abs(var.ravel()), kind="stable")[:k]] = True
        taus = taus * keep.reshape(var.shape)
    elected = np.where(taus.sum(0) >= 0, 1.0, -1.0)
    agree = np.sign(taus) == elected
    energy = (taus**2).reshape(len(models), -1).mean(1)
    w = energy / energy.sum() if abs(energy.sum()) >= 1e-6 else np.full(len(models), 1 / len(models))
    w = w.reshape(-1, *([1] * base.ndim)) * agree
    return base + (taus * w).sum(0) / np.maximum(w.sum(0), 1e-6)


def ref_ram(base, models, eps, r=0.0, alpha=0.0):
    taus = np.stack([tv(m, base).ravel() for m in models])
    moved = np.abs(taus) > eps
    count = moved.sum(0)
    alone, shared = count == 1, count > 1
    out = np.zeros(taus.shape[1])
    for i in range(len(models)):
        scale = 1 + r * np.clip((moved[i] & shared).sum() / max((moved[i] & alone).sum(), eps), 0, alpha) if r else 1
        out += np.where(moved[i] & alone, taus[i] * scale, 0) + np.where(
            moved[i] & shared, taus[i] / np.maximum(count, 1), 0
        )
    return base + out.reshape(base.shape)


METHOD_CASES = {  # mergekit method: (recipe fields, reference from base, the models' tensors, name)
    "task_arithmetic": (
        {
            "base": True,
            "models": {"a": {"weight": 0.7}, "b": {"weight": 0.4}},
            "parameters": {"lambda": 0.8, "normalize": True},
        },
        lambda b, m, n: gta(b, None, [0.7, 0.4], [m["a"] - b, m["b"] - b], False, True, 0.8),
    ),
    "breadcrumbs": (
        {
            "base": True,
            "models": {"a": {"weight": 0.7, "density": 0.8, "gamma": 0.05}, "b": {"weight": 0.4, "density": 0.6}},
        },
        lambda b, m, n: gta(
            b, None, [0.7, 0.4], [outliers(tv(m["a"], b), 0.8, 0.05), outliers(tv(m["b"], b), 0.6, 0.01)], False, False
        ),
    ),
    "breadcrumbs_ties": (
        {
            "base": True,
            "models": {"a": {"weight": 0.7, "density": 0.8}, "b": {"weight": 0.4, "density": 0.6}},
            "parameters": {"gamma": 0.1},
        },
        lambda b, m, n: gta(
            b, None, [0.7, 0.4], [outliers(tv(m["a"], b), 0.8, 0.1), outliers(tv(m["b"], b), 0.6, 0.1)], True, False
        ),
    ),
    "ties": (
        {
            "base": True,
            "models": {
                "a": {"weight": 1.0, "density": 0.4},
                "b": {"weight": 0.5, "density": 0.6},
                "c": {"weight": 0.5, "density": 0.6},
            },
        },
        lambda b, m, n: gta(
            b, None, [1.0, 0.5, 0.5], [magnitude(tv(m[k], b), d) for k, d in zip("abc", (0.4, 0.6, 0.6))], True, True
        ),
    ),
    "dare_ties": (  # density 1: no drop, so the formula is exact (mergekit: no normalising by default)
        {"base": True, "models": {"a": {"weight": 0.5}, "b": {"weight": 0.5}}},
        lambda b, m, n: gta(b, None, [0.5, 0.5], [m["a"] - b, m["b"] - b], True, False),
    ),
    "della": (
        {"base": True, "models": {"a": {"weight": 0.5}, "b": {"weight": 0.3}}, "parameters": {"lambda": 0.9}},
        lambda b, m, n: gta(b, None, [0.5, 0.3], [m["a"] - b, m["b"] - b], True, True, 0.9),
    ),
    "slerp": (
        {"base": "a", "models": {"a": {}, "b": {}}, "parameters": {"t": [0, 0.3, 1]}},
        lambda b, m, n: slerp(evaluate([0, 0.3, 1], n, t_of(n)), m["a"], m["b"]),
    ),
    "nuslerp": (
        {
            "base": True,
            "models": {"a": {"weight": 0.3}, "b": {"weight": 0.7}},
            "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
        },
        lambda b, m, n: b + ref_nuslerp(0.7, m["a"] - b, m["b"] - b, True, False),
    ),
    "multislerp": (
        {"base": True, "models": {"a": {"weight": 0.3}, "b": {"weight": 0.5}}},
        lambda b, m, n: b + ref_multislerp([m["a"] - b, m["b"] - b], [0.3, 0.5]),
    ),
    "karcher": (
        {"base": False, "models": {"a": {}, "b": {}, "c": {}}, "parameters": {"max_iter": 20}},
        lambda b, m, n: ref_karcher([m["a"], m["b"], m["c"]], 20),
    ),
    "model_stock": (
        {"base": True, "models": {"a": {}, "b": {}, "c": {}}, "parameters": {"filter_wise": True}},
        lambda b, m, n: ref_model_stock(b, [m["a"], m["b"], m["c"]], True),
    ),
    "sce": (
        {"base": True, "models": {"a": {}, "b": {}, "c": {}}, "parameters": {"select_topk": 0.3}},
        lambda b, m, n: ref_sce(b, [m["a"], m["b"], m["c"]], 0.3),
    ),
    "ram": (
        {"base": True, "models": {"a": {}, "b": {}}, "parameters": {"epsilon": 1e-3}},
        lambda b, m, n: ref_ram(b, [m["a"], m["b"]], 1e-3),
    ),
    "ramplus_tl": (
        {"base": True, "models": {"a": {}, "b": {}}, "parameters": {"epsilon": 1e-3, "r": 0.5, "alpha": 0.3}},
        lambda b, m, n: ref_ram(b, [m["a"], m["b"]], 1e-3, 0.5, 0.3),
    ),
    "nearswap": (
        {"base": True, "models": {"a": {}}, "parameters": {"t": 0.001}},
        lambda b, m, n: (w := np.clip(0.001 / np.maximum(np.abs(b - m["a"]), 1e-6), 0, 1)) * m["a"] + (1 - w) * b,
    ),
    "linear": (
        {"base": False, "models": {"a": {"weight": 2}, "b": {"weight": 1}}, "parameters": {"normalize": False}},
        lambda b, m, n: 2 * m["a"] + m["b"],
    ),
    "passthrough": (
        {"base": False, "models": {"a": {"scale": [1.0, 0.5]}}},
        lambda b, m, n: m["a"] * evaluate([1.0, 0.5], n, t_of(n)),
    ),
}


@pytest.mark.parametrize("method", sorted(METHOD_CASES))
def test_every_mergekit_method_equals_its_formula(method, zoo4, run_cli, tmp_path):
    _, p = zoo4
    fields, reference = METHOD_CASES[method]
    recipe = {
        "merge_method": method,
        "models": [{"model": p[k], **({"parameters": v} if v else {})} for k, v in fields["models"].items()],
        **({"parameters": fields["parameters"]} if "parameters" in fields else {}),
        "dtype": "float32",
    }
    if fields["base"]:
        recipe["base_model"] = p["base"] if fields["base"] is True else p[fields["base"]]
    got = run(run_cli, tmp_path, recipe)
    base, models = tensors(p["base"]), {k: tensors(p[k]) for k in "abc"}
    want = {n: reference(base[n], {k: models[k][n] for k in "abc"}, n) for n in base}
    close(got, want, atol=5e-6)


# ---- random drops: mergekit's expected behaviour --------------------------------------------


@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
def test_random_drops_keep_mergekits_l1_norm_and_density(method, zoo4, run_cli, tmp_path):
    """One model at weight 1: the merged τ keeps about `density` of the entries, unchanged up to one
    factor, and has τ's L1 norm exactly (mergekit's `rescale: true`)."""
    _, p = zoo4
    recipe = {
        "merge_method": method,
        "base_model": p["base"],
        "dtype": "float32",
        "models": [{"model": p["a"], "parameters": {"weight": 1.0, "density": 0.5}}],
    }
    got = run(run_cli, tmp_path, recipe)
    base, a = tensors(p["base"]), tensors(p["a"])
    kept = total = 0
    for n in base:
        tau, merged = tv(a[n], base[n]), got[n] - base[n]
        moved = np.abs(tau) > 1e-4  # smaller: float32 rounding of θ_b + τ blurs the ratio
        if moved.sum() < 100:
            continue
        keep = (np.abs(merged) > 0) & moved
        kept, total = kept + (keep & moved).sum(), total + moved.sum()
        assert np.abs(merged).sum() == pytest.approx(np.abs(tau).sum(), rel=1e-5), n
        ratio = merged[keep] / tau[keep]
        assert np.allclose(ratio, ratio[0], rtol=1e-4), n  # one factor for the tensor
    assert kept / total == pytest.approx(0.5, abs=0.02)


def test_della_keeps_large_entries_more_often(zoo4):
    from weightlab.merging.sparsify import della_drop

    gen = torch.Generator().manual_seed(0)
    tau = torch.linspace(-1, 1, 20001).reshape(1, -1)
    kept = (della_drop(tau, 0.5, 0.3, gen, "none") != 0).reshape(-1)
    order = tau.abs().reshape(-1).argsort()
    low, high = kept[order[:4000]].float().mean(), kept[order[-4000:]].float().mean()
    assert float(low) == pytest.approx(0.2 + 0.06 * 0.5, abs=0.03) and float(high) == pytest.approx(0.77, abs=0.03)


# ---- refusals: what mergekit would do differently, or not at all -----------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        ({"modules": {}}, "modules: (models of several modules) is not supported"),
        ({"merge_method": "frobnicate"}, "merge_method 'frobnicate' is not supported"),
        ({"mergemethod": "ties"}, "mergekit keys not supported here: mergemethod"),
        ({"models": [{"model": "A"}, {"model": "B", "parameters": {"density": 0.5}}]}, "needs weight for A"),
        ({"models": [{"model": "A+lora", "parameters": {"weight": 1}}]}, "applies a LoRA to a model"),
        ({"parameters": {"rescale": True}}, "ties with rescale is not supported"),
        ({"models": [{"model": "A", "parameters": {"weight": 1, "lambda": 2}}]}, "lambda is one value for all models"),
        ({"models": [{"model": "A", "parameters": {"weight": 1, "t": 0.5}}]}, "ties does not use t"),
        ({"parameters": {"density": {"filter": "mlp"}}}, "must be {filter: text, value"),
        ({"slices": [{"sources": [{"model": "A", "layer_range": [0, 2]}], "residual_weight": 0.5}]}, "residual_weight"),
        ({"tokenizer_source": "base", "tokenizer": {"source": "union"}}, "not both"),
        ({"chat_template": "chatml"}, "named templates are mergekit's files"),
    ],
)
def test_what_mergekit_does_differently_is_refused_by_name(change, message, tmp_path):
    recipe = {"merge_method": "ties", "base_model": "BASE", "models": [{"model": "A", "parameters": {"weight": 1}}]}
    recipe.update(change)
    if "slices" in change:
        del recipe["models"]
    (tmp_path / "r.yml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(WeightlabError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        build_config(load_config(tmp_path / "r.yml"))


def test_slices_of_different_shapes_are_refused_before_any_work(zoo4, run_cli, tmp_path):
    _, p = zoo4
    sources = [{"model": p["a"], "layer_range": [0, 2]}, {"model": p["b"], "layer_range": [0, 3]}]
    recipe = {"merge_method": "slerp", "base_model": p["a"], "parameters": {"t": 0.5}, "slices": [{"sources": sources}]}
    (tmp_path / "r.yml").write_text(yaml.safe_dump(recipe))
    code, _, err = run_cli("merge", "--config", tmp_path / "r.yml", "-o", tmp_path / "out")
    assert code == 2 and "the same number of layers" in err and not (tmp_path / "out").exists()
    recipe["slices"][0]["sources"][0]["layer_range"] = [0, 4]
    recipe["slices"][0]["sources"][1]["layer_range"] = [2, 6]
    (tmp_path / "r.yml").write_text(yaml.safe_dump(recipe))
    code, _, err = run_cli("merge", "--config", tmp_path / "r.yml", "-o", tmp_path / "out")
    assert code == 2 and "is not a range of the model's layers" in err


# ---- records: ours replays, mergekit's reads back --------------------------------------------


def test_a_mergekit_recipe_leaves_both_records_and_each_makes_the_same_bytes(zoo4, run_cli, tmp_path):
    _, p = zoo4
    recipe = {
        "models": [{"model": p[k], "parameters": v} for k, v in TIES_EXAMPLE.items()],
        "merge_method": "ties",
        "base_model": p["base"],
        "dtype": "bfloat16",
    }
    run(run_cli, tmp_path, recipe)
    first = tmp_path / "out"
    assert (first / "mergekit_config.yml").is_file() and (first / "weightlab_merge.yml").is_file()
    written = yaml.safe_load((first / "mergekit_config.yml").read_text())
    assert written["merge_method"] == "ties" and written["out_dtype"] == "bfloat16"
    files = lambda d: {f.name: f.read_bytes() for f in d.iterdir() if f.suffix == ".safetensors"}
    for record in ("weightlab_merge.yml", "mergekit_config.yml"):
        again = tmp_path / f"again-{record}"
        code, _, err = run_cli("merge", "--config", first / record, "-o", again)
        assert code == 0, err
        assert files(again) == files(first), record


def test_a_recipe_mergekit_cannot_say_writes_no_mergekit_record(zoo4, run_cli, tmp_path):
    _, p = zoo4
    code, _, err = run_cli("merge", "--method", "iso-c", "--base", p["base"], p["a"], p["b"], "-o", tmp_path / "m")
    assert code == 0, err
    assert not (tmp_path / "m" / "mergekit_config.yml").exists()
    code, _, err = run_cli(
        "merge", "--method", "ties", "--base", p["base"], p["a"], p["b"], "--density", "0.5", "-o", tmp_path / "t"
    )
    assert code == 0, err
    written = yaml.safe_load((tmp_path / "t" / "mergekit_config.yml").read_text())
    assert written["parameters"]["density"] == 0.5 and [m["parameters"]["weight"] for m in written["models"]] == [
        1.0,
        1.0,
    ]


# ---- tokenizers: every model's rows on one vocabulary ----------------------------------------


@pytest.fixture(scope="module")
def chat_fts(zoo4, tmp_path_factory):
    """Two fine-tunes that added tokens (a chat template's), their embedding and head resized."""
    from transformers import AutoTokenizer

    root, _ = zoo4
    out = {}
    for name, seed, added in (("ta", 1, ["<|im_start|>", "<|im_end|>", "<tool>"]), ("tb", 2, ["<tool>", "<x>"])):
        model = synthetic.finetune(
            synthetic.tiny_model("llama", seed=0, layers=LAYERS, causal_lm=True), steps=2, seed=seed
        )
        folder = root / name
        synthetic.tiny_tokenizer(folder)
        tok = AutoTokenizer.from_pretrained(folder)
        tok.add_tokens(added, special_tokens=name == "ta")
        model.resize_token_embeddings(len(tok), mean_resizing=False)
        torch.manual_seed(seed)
        with torch.no_grad():
            model.get_input_embeddings().weight[128:] = torch.randn(len(tok) - 128, 32)
            model.get_output_embeddings().weight[128:] = torch.randn(len(tok) - 128, 32)
        synthetic.save(model, folder)
        tok.save_pretrained(folder)
        out[name] = str(folder)
    return out


def expected_row(token, own, inputs):
    """mergekit's rule for the merged row of one token (weights ta 0.6, tb 0.4, base 0): a model
    lacking the token (or, for a forced token, every model) takes its default row: the recipe's
    (zeros for <new>, tb's row for w7), else the one model's that has it, else the base's, else
    the mean of those that have it."""
    having = [k for k in ("ta", "tb", "base") if token in own[k]]
    if token == "<new>":
        default = np.zeros(32)
    elif token == "w7":
        default = inputs["tb"][own["tb"][token]]
    elif len(having) == 1:
        default = inputs[having[0]][own[having[0]][token]]
    elif "base" in having:
        default = inputs["base"][own["base"][token]]
    else:
        default = np.mean([inputs[k][own[k][token]] for k in having], 0)

    def row(k):
        return inputs[k][own[k][token]] if token in own[k] and token != "w7" else default

    return 0.6 * row("ta") + 0.4 * row("tb") + 0.0 * row("base")


@pytest.mark.parametrize("source", ["union", "base", "ta"])
def test_vocabularies_are_aligned_as_mergekit_aligns_them(source, zoo4, chat_fts, run_cli, tmp_path):
    """Linear 0.6/0.4 over a base's vocabulary, one model's, or the union: a token both have
    merges their rows; one only one model has takes its row in both; a row the recipe places comes
    from there; the padding rows are the mean; transformers loads the model and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, p = zoo4
    sources = {"union": "union", "base": "base", "ta": chat_fts["ta"]}
    recipe = {
        "merge_method": "linear",
        "base_model": p["base"],
        "models": [
            {"model": chat_fts["ta"], "parameters": {"weight": 0.6}},
            {"model": chat_fts["tb"], "parameters": {"weight": 0.4}},
            {"model": p["base"], "parameters": {"weight": 0.0}},
        ],
        "tokenizer": {
            "source": sources[source],
            "pad_to_multiple_of": 8,
            "tokens": {"<new>": {"source": {"kind": "zero"}}, "w7": {"source": chat_fts["tb"], "force": True}},
        },
        "dtype": "float32",
    }
    got = run(run_cli, tmp_path, recipe)
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    vocab = tok.get_vocab()
    own = {
        k: AutoTokenizer.from_pretrained(path).get_vocab()
        for k, path in (("ta", chat_fts["ta"]), ("tb", chat_fts["tb"]), ("base", p["base"]))
    }
    expected_tokens = {"union": set(own["ta"]) | set(own["tb"]), "base": set(own["base"]), "ta": set(own["ta"])}[
        source
    ] | {"<new>"}
    assert set(vocab) == expected_tokens
    rows = len(vocab) + (-len(vocab)) % 8
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        inputs = {k: tensors(chat_fts[k] if k != "base" else p["base"])[name] for k in ("ta", "tb", "base")}
        assert got[name].shape == (rows, 32)
        for token, index in vocab.items():
            want = expected_row(token, own, inputs)
            np.testing.assert_allclose(got[name][index], want, atol=1e-6, err_msg=f"{name} {token}")
        padding = np.broadcast_to(got[name][: len(vocab)].mean(0), (rows - len(vocab), 32))
        np.testing.assert_allclose(got[name][len(vocab) :], padding, atol=1e-6)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == rows
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.get_input_embeddings().weight.shape[0] == rows and len(tok) == len(vocab)
    assert (
        yaml.safe_load((tmp_path / "out" / "mergekit_config.yml").read_text())["tokenizer"]["source"] == sources[source]
    )


def test_a_chat_template_goes_into_the_output_tokenizer(zoo4, run_cli, tmp_path):
    _, p = zoo4
    assert p
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    recipe = {
        "merge_method": "linear",
        "models": [{"model": p["a"], "parameters": {"weight": 1}}],
        "chat_template": template,
        "dtype": "float32",
    }
    run(run_cli, tmp_path, recipe)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok.apply_chat_template([{"role": "user", "content": "w1"}], tokenize=False) == "<user>w1"


# ---- recipes of several merges (mergekit-multi) ----------------------------------------------


def test_stages_run_in_order_and_equal_running_them_one_by_one(zoo4, run_cli, tmp_path):
    _, p = zoo4
    first = {
        "name": "first",
        "merge_method": "ties",
        "base_model": p["base"],
        "dtype": "float32",
        "models": [
            {"model": p["a"], "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": p["b"], "parameters": {"weight": 0.5, "density": 0.5}},
        ],
    }
    final = {
        "merge_method": "linear",
        "dtype": "float32",
        "models": [
            {"model": "second", "parameters": {"weight": 0.5}},
            {"model": p["base"], "parameters": {"weight": 0.5}},
        ],
    }
    second = {
        "name": "second",
        "merge_method": "slerp",
        "base_model": p["c"],
        "parameters": {"t": 0.3},
        "dtype": "float32",
        "models": [{"model": p["c"]}, {"model": "first"}],
    }
    (tmp_path / "multi.yml").write_text(yaml.safe_dump_all([final, first, second], sort_keys=False))  # any order
    code, _, err = run_cli("merge", "--config", tmp_path / "multi.yml", "-o", tmp_path / "all")
    assert code == 0, err
    for stage, name in ((first, "s1"), (second, "s2"), (final, "s3")):
        stage = {k: v for k, v in stage.items() if k != "name"}
        text = (
            yaml.safe_dump(stage)
            .replace("model: first", f"model: {tmp_path / 's1'}")
            .replace("model: second", f"model: {tmp_path / 's2'}")
        )
        (tmp_path / f"{name}.yml").write_text(text)
        code, _, err = run_cli("merge", "--config", tmp_path / f"{name}.yml", "-o", tmp_path / name)
        assert code == 0, err
    assert (tmp_path / "all" / "model.safetensors").read_bytes() == (tmp_path / "s3" / "model.safetensors").read_bytes()
    assert set(json.loads((tmp_path / "all" / "weightlab_stages.json").read_text())) == {"first", "second"}
    assert not [q for q in tmp_path.iterdir() if "partial" in q.name]  # the stages' folder is gone
    code, _, err = run_cli("merge", "--config", tmp_path / "all" / "weightlab_merge.yml", "-o", tmp_path / "again")
    assert code == 0, err
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (
        tmp_path / "all" / "model.safetensors"
    ).read_bytes()


@pytest.mark.parametrize(
    "docs, message",
    [
        (
            [
                {"merge_method": "linear", "models": [{"model": "x", "parameters": {"weight": 1}}]},
                {"name": "x", "merge_method": "linear", "models": [{"model": "y", "parameters": {"weight": 1}}]},
                {"name": "y", "merge_method": "linear", "models": [{"model": "x", "parameters": {"weight": 1}}]},
            ],
            "circle",
        ),
        (
            [
                {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1}}]},
                {"merge_method": "linear", "models": [{"model": "b", "parameters": {"weight": 1}}]},
            ],
            "more than one stage has no name",
        ),
        (
            [
                {"name": "x", "merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1}}]},
                {"name": "x", "merge_method": "linear", "models": [{"model": "b", "parameters": {"weight": 1}}]},
            ],
            "same name",
        ),
    ],
)
def test_stages_that_cannot_run_are_refused(docs, message, run_cli, tmp_path):
    (tmp_path / "m.yml").write_text(yaml.safe_dump_all(docs))
    code, _, err = run_cli("merge", "--config", tmp_path / "m.yml", "-o", tmp_path / "out")
    assert code == 2 and message in err and not (tmp_path / "out").exists()
    code, _, err = run_cli("merge", "--config", tmp_path / "m.yml", "--method", "ties", "-o", tmp_path / "out")
    assert code == 2
