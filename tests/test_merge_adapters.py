"""`merge --as-adapter`: LoRA adapters merged into a LoRA adapter that PEFT loads, equal to the
dense merge of the same method, of the rank the method says."""

from __future__ import annotations

import pytest
import torch
from test_lora import peft_merged

from weightlab.io import open_checkpoint, open_finetuned, open_weights
from weightlab.merging.methods import METHODS
from weightlab.merging.params import resolve
from weightlab.merging.ties import ties


def _dense_knots_ties(taus: list[torch.Tensor], density: float, lam: float) -> torch.Tensor:
    """KnOTS-TIES from dense updates, written independently: one SVD of the column-concatenated
    updates, TIES on the V_iᵀ blocks, UΣV_mergedᵀ."""
    u, s, vh = torch.linalg.svd(torch.cat(taus, 1), full_matrices=False)
    keep = s > s[0] * 1e-12
    u, s, vh = u[:, keep], s[keep], vh[keep]
    n = taus[0].shape[1]
    blocks = [vh[:, i * n : (i + 1) * n] for i in range(len(taus))]
    params = resolve(METHODS["ties"].params, {"density": density, "lambda": lam}, "ties")
    merged = ties(torch.zeros_like(blocks[0]), blocks, torch.ones(len(blocks), dtype=s.dtype), params, None)
    return (u * s) @ merged


@pytest.fixture()
def pair(adapters):
    return adapters["llama"], adapters["llama_rslora_pattern"]  # different modules, ranks and alpha patterns


def test_task_arithmetic_as_adapter_is_exact_and_of_the_summed_rank(zoo, pair, run_cli, tmp_path):
    out = tmp_path / "ta"
    code, _, err = run_cli(
        "merge",
        "--as-adapter",
        "--method",
        "task-arithmetic",
        "--base",
        zoo["llama"],
        *pair,
        "--weights",
        "0.7,0.4",
        "--lambda",
        "0.9",
        "-o",
        out,
        "--report",
        tmp_path / "r.html",
    )
    assert code == 0, err
    base = open_weights(zoo["llama"])
    fts = [open_finetuned(p, base) for p in pair]
    merged = peft_merged(zoo["llama"], out)  # PEFT loads it and merges it
    adapter = open_checkpoint(out)
    for name in base.names():
        w = base.get(name).double()
        expected = w + 0.9 * sum(c * (ft.get(name).double() - w) for c, ft in zip((0.7, 0.4), fts))
        torch.testing.assert_close(merged[name].double(), expected, atol=2e-6, rtol=1e-5, msg=name)
    sources = [open_checkpoint(p) for p in pair]
    for module, m in adapter.modules.items():
        assert m.rank == sum(s.modules[module].rank for s in sources if module in s.modules)
    size = (out / "adapter_model.safetensors").stat().st_size
    payload = sum(4 * m.rank * (m.a.shape[1] + m.b.shape[0]) for m in adapter.modules.values())
    assert payload <= size < payload + 8192  # the factors and a header, nothing dense
    assert (tmp_path / "r.html").is_file()


def test_ties_as_adapter_equals_ties_in_the_joint_space_computed_densely(zoo, pair, run_cli, tmp_path):
    out = tmp_path / "ties"
    code, _, err = run_cli(
        "merge",
        "--as-adapter",
        "--method",
        "ties",
        "--base",
        zoo["llama"],
        *pair,
        "--density",
        "0.4",
        "--weights",
        "1,0.5",
        "-o",
        out,
    )
    assert code == 0, err
    base = open_weights(zoo["llama"])
    fts = [open_finetuned(p, base) for p in pair]
    merged = open_finetuned(out, base)
    peft = peft_merged(zoo["llama"], out)
    changed = set().union(*(set(ft.module_of) for ft in fts))
    for name in sorted(changed):
        w = base.get(name).double()
        # each dense τ_i in float64 (W' − W in float32 would add rounding noise directions)
        taus = [
            c * ft.adapter.delta(ft.module_of[name], dtype=torch.float64)
            for c, ft in zip((1.0, 0.5), fts)
            if name in ft.module_of
        ]
        expected = _dense_knots_ties(taus, 0.4, 1.0)
        got = merged.get(name).double() - w
        assert torch.allclose(got, expected, atol=1e-5 * float(expected.abs().max()) + 1e-7), name
        torch.testing.assert_close(peft[name].double(), merged.get(name).double(), atol=2e-6, rtol=1e-5)


def _dense_tsv_of_real_directions(taus: list[torch.Tensor]) -> torch.Tensor:
    """TSV-M written out with dense float64 SVDs, each task keeping its top min(rank, ⌊min(m, n)/N⌋)."""
    keep = min(taus[0].shape) // len(taus)
    us, ss, vs = [], [], []
    for tau in taus:
        u, s, vh = torch.linalg.svd(tau, full_matrices=False)
        k = min(keep, int((s > s[0] * 1e-10).sum()))
        us.append(u[:, :k]), ss.append(s[:k]), vs.append(vh[:k].T)
    polar = lambda x: (lambda p, _, qt: p @ qt)(*torch.linalg.svd(x, full_matrices=False))
    return (polar(torch.cat(us, 1)) * torch.cat(ss)) @ polar(torch.cat(vs, 1)).T


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    """A third adapter of the tiny Llama with factors of its own (the fixtures' two share lora_A
    directions, and TSV's orthogonalisation of a rank-deficient stack is not unique)."""
    from peft import LoraConfig, get_peft_model

    from weightlab import synthetic

    model = get_peft_model(
        synthetic.tiny_model("llama", seed=0),
        LoraConfig(init_lora_weights=False, r=3, lora_alpha=6, target_modules=["q_proj", "o_proj"]),
    )
    gen = torch.Generator().manual_seed(11)  # PEFT's own init repeats the other adapters' lora_A
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=gen))
    folder = tmp_path_factory.mktemp("other") / "adapter"
    model.save_pretrained(folder)
    return folder


def test_tsv_as_adapter_equals_dense_tsv_on_the_real_directions(zoo, adapters, other, run_cli, tmp_path):
    pair = (adapters["llama"], other)
    out = tmp_path / "tsv"
    code, _, err = run_cli(
        "merge", "--as-adapter", "--method", "tsv", "--base", zoo["llama"], *pair, "--lambda", "0.8", "-o", out
    )
    assert code == 0, err
    base = open_weights(zoo["llama"])
    fts = [open_finetuned(p, base) for p in pair]
    merged = open_finetuned(out, base)
    adapter = open_checkpoint(out)
    for name in sorted(set().union(*(set(ft.module_of) for ft in fts))):
        taus = [ft.adapter.delta(ft.module_of[name], dtype=torch.float64) for ft in fts if name in ft.module_of]
        expected = 0.8 * _dense_tsv_of_real_directions(taus)
        got = merged.get(name).double() - base.get(name).double()
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4, msg=name)
        sources = [open_checkpoint(p) for p in pair]
        module = name.removesuffix(".weight")
        assert adapter.modules[module].rank == sum(s.modules[module].rank for s in sources if module in s.modules)
    peft_merged(zoo["llama"], out)


def test_max_rank_keeps_the_best_rank_k_update(zoo, pair, run_cli, tmp_path):
    code, _, err = run_cli(
        "merge", "--as-adapter", "--method", "task-arithmetic", "--base", zoo["llama"], *pair, "-o", tmp_path / "full"
    )
    assert code == 0, err
    code, _, err = run_cli(
        "merge",
        "--as-adapter",
        "--method",
        "task-arithmetic",
        "--base",
        zoo["llama"],
        *pair,
        "--max-rank",
        "3",
        "-o",
        tmp_path / "r3",
    )
    assert code == 0, err
    base = open_weights(zoo["llama"])
    full, cut = open_finetuned(tmp_path / "full", base), open_finetuned(tmp_path / "r3", base)
    assert max(m.rank for m in open_checkpoint(tmp_path / "r3").modules.values()) <= 3
    for name in full.module_of:
        w = base.get(name).double()
        u, s, vh = torch.linalg.svd(full.get(name).double() - w, full_matrices=False)
        torch.testing.assert_close(cut.get(name).double() - w, (u[:, :3] * s[:3]) @ vh[:3], atol=1e-5, rtol=1e-4)


def test_as_adapter_refusals(zoo, pair, run_cli, tmp_path):
    cases = [
        (["--method", "cart", "--base", zoo["llama"], *pair], "--as-adapter merges with"),
        (["--method", "task-arithmetic", "--base", zoo["llama"], zoo["llama_ft"], pair[0]], "this is a checkpoint"),
        (["--method", "task-arithmetic", "--base", zoo["gpt2"], *pair], ""),
        (["--method", "task-arithmetic", "--coeff", "nan", "--base", zoo["llama"], *pair], "--coeff nan"),
    ]
    for args, message in cases:
        code, _, err = run_cli("merge", "--as-adapter", *args, "-o", tmp_path / "x")
        assert code == 2 and message in err, (args, err)
    code, _, err = run_cli(
        "merge",
        "--method",
        "task-arithmetic",
        "--base",
        zoo["llama"],
        zoo["llama_ft"],
        "--max-rank",
        "2",
        "-o",
        tmp_path / "x",
    )
    assert code == 2 and "--as-adapter" in err
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def zero_adapter(tmp_path_factory):
    """PEFT's default initialisation: B = 0, so the adapter changes nothing."""
    from peft import LoraConfig, get_peft_model

    from weightlab import synthetic

    torch.manual_seed(11)
    folder = tmp_path_factory.mktemp("zero") / "adapter"
    get_peft_model(
        synthetic.tiny_model("llama", seed=0), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    ).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("method", ["task-arithmetic", "ties", "tsv"])
def test_a_zero_adapter_contributes_no_direction(zoo, adapters, zero_adapter, run_cli, tmp_path, method):
    """Merging with an adapter that changes nothing gives the merge without it: no null direction
    stacked (TSV), no rank added (task arithmetic), the same update (TIES)."""
    alone, with_zero = tmp_path / "alone", tmp_path / "with-zero"
    common = ["merge", "--as-adapter", "--method", method, "--base", zoo["llama"], "--lambda", "0.8"]
    weights = {"alone": ["--weights", "1"], "with-zero": ["--weights", "1,1"]}
    assert run_cli(*common, adapters["llama"], *weights["alone"], "-o", alone)[0] == 0
    code, _, err = run_cli(*common, adapters["llama"], zero_adapter, *weights["with-zero"], "-o", with_zero)
    assert code == 0, err
    base = open_weights(zoo["llama"])
    a, b = open_finetuned(alone, base), open_finetuned(with_zero, base)
    for name in a.module_of:
        torch.testing.assert_close(b.get(name), a.get(name), atol=1e-6, rtol=1e-5, msg=name)
    if method == "task-arithmetic":
        assert {m.rank for m in open_checkpoint(with_zero).modules.values()} == {4}


# ---- core space (Panariello et al. 2025): every other method, on the factors -------------------

from weightlab.merging.adapters import core_space


def _factors(m, n, ranks, seed):
    gen = torch.Generator().manual_seed(seed)
    return (
        [torch.randn(m, r, generator=gen, dtype=torch.float64) for r in ranks],
        [torch.randn(r, n, generator=gen, dtype=torch.float64) for r in ranks],
    )


@pytest.mark.parametrize("method", ["iso-c", "wudi", "model-stock", "task-arithmetic", "nan"])
def test_core_space_equals_the_dense_merge_for_methods_that_commute_with_a_change_of_basis(method):
    """Mixed ranks (2, 5, 3): the core-space merge, densified, is the dense merge of the densified
    updates to float64 round-off; its rank is at most Σr_i."""
    lefts, rights = _factors(40, 30, (2, 5, 3), seed=1)
    spec = METHODS[method]
    params = spec.resolve({"lambda": 0.7} if spec.param("lambda") else {})
    gen = lambda i: torch.Generator().manual_seed(i)
    left, right = core_space(lefts, rights, spec, params, gen)
    assert left.shape == (40, 10) and right.shape == (10, 30)
    zero = torch.zeros(40, 30, dtype=torch.float64)
    dense = spec.fn(zero, [a @ b for a, b in zip(lefts, rights)], torch.ones(3, dtype=torch.float64), params, gen)
    torch.testing.assert_close(left @ right, dense, atol=1e-10, rtol=1e-10)


def test_iso_c_as_adapter_equals_dense_iso_c_of_the_densified_adapters(zoo, pair, run_cli, tmp_path):
    out = tmp_path / "iso"
    code, _, err = run_cli(
        "merge", "--as-adapter", "--method", "iso-c", "--base", zoo["llama"], *pair, "--lambda", "0.6", "-o", out
    )
    assert code == 0, err
    base = open_weights(zoo["llama"])
    fts = [open_finetuned(p, base) for p in pair]
    merged = peft_merged(zoo["llama"], out)  # PEFT loads it and merges it
    spec = METHODS["iso-c"]
    params = spec.resolve({"lambda": 0.6})
    sources = [open_checkpoint(p) for p in pair]
    adapter = open_checkpoint(out)
    for name in sorted(set().union(*(set(ft.module_of) for ft in fts))):
        w = base.get(name).double()
        models = [ft.get(name).double() for ft in fts]
        want = spec.fn(w, models, torch.ones(2, dtype=torch.float64), params, None)
        torch.testing.assert_close(merged[name].double(), want, atol=2e-6, rtol=1e-5, msg=name)
        module = name.removesuffix(".weight")
        assert adapter.modules[module].rank == sum(s.modules[module].rank for s in sources if module in s.modules)
    size = (out / "adapter_model.safetensors").stat().st_size
    payload = sum(4 * m.rank * (m.a.shape[1] + m.b.shape[0]) for m in adapter.modules.values())
    assert payload <= size < payload + 8192  # the factors and a header, nothing dense


@pytest.mark.parametrize("method", ["iso-cts", "pcb", "dare-ties", "ace", "breadcrumbs"])
def test_methods_that_do_not_commute_merge_in_core_space_and_peft_loads_them(zoo, pair, run_cli, tmp_path, method):
    out = tmp_path / method
    code, _, err = run_cli("merge", "--as-adapter", "--method", method, "--base", zoo["llama"], *pair, "-o", out)
    assert code == 0, err
    merged = peft_merged(zoo["llama"], out)
    assert all(torch.isfinite(t).all() for t in merged.values())
    base = open_weights(zoo["llama"])
    assert any(not torch.equal(merged[n], base.get(n)) for n in base.names())


@pytest.mark.parametrize("method", ["task-arithmetic", "ties", "tsv", "iso-c", "dare-linear"])
def test_lambda_auto_as_adapter_scales_each_module_by_the_documented_rule(method, zoo, pair, run_cli, tmp_path):
    """--lambda auto on --as-adapter (once ignored: λ = 1 with `lambda: auto` in the record): each
    module's update at λ = 1, scaled to ‖Σ c_iτ_i‖/Σ|c_i|, τ_i the densified adapters (PEFT's
    merge_and_unload); a negative weight counts by its size. The record holds every λ chosen."""
    import json

    base = open_weights(zoo["llama"])
    fts = [open_finetuned(p, base) for p in pair]
    weights = (0.8, 0.6) if METHODS[method].normalises else (0.8, -0.6)  # TIES divides by Σc_i
    common = ["merge", "--as-adapter", "--method", method, "--base", zoo["llama"], *pair]
    common += ["--weights", ",".join(map(str, weights))]
    common += ["--param", "density=0.5"] if method in ("ties", "dare-linear") else []
    one, auto = tmp_path / "one", tmp_path / "auto"
    assert run_cli(*common, "--lambda", "1", "-o", one)[0] == 0
    code, _, err = run_cli(*common, "--lambda", "auto", "-o", auto, "--json", tmp_path / "r.json")
    assert code == 0, err
    at_one, chosen = peft_merged(zoo["llama"], one), peft_merged(zoo["llama"], auto)
    record = json.loads((tmp_path / "r.json").read_text())
    lambdas = record["auto_lambda"]
    adapted = sorted({n for ft in fts for n in ft.module_of})
    assert set(lambdas) == set(adapted)
    for name in adapted:
        w = base.get(name).double()
        summed = sum(c * (ft.get(name).double() - w) for c, ft in zip(weights, fts))
        update = at_one[name].double() - w
        moved = float(update.norm())
        lam = float(summed.norm()) / (sum(map(abs, weights)) * moved) if moved else 1.0  # DARE may drop all
        assert lambdas[name] == pytest.approx(lam, rel=1e-4), name
        torch.testing.assert_close(chosen[name].double() - w, lam * update, atol=2e-6, rtol=1e-4, msg=name)
    assert record["config"]["params"]["lam"] == "auto"
    assert "lambda: auto" in (auto / "weightlab_merge.yml").read_text()
