"""slim-experts: an MoE model with K experts per block, merged (each cluster of alike experts
becomes their mean, router rows likewise) or pruned; the output loads in transformers with
nothing missing, on models made by transformers' config classes, checked against plain
computations on the module's own parameters."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_experts import _moe

import weightlab as wl
from weightlab.cli import main
from weightlab.errors import WeightlabError


def _near_copy(model, layer: int = 0, of: int = 1, into: int = 3):
    mlp = model.model.layers[layer].mlp
    with torch.no_grad():
        mlp.experts.gate_up_proj[into] = mlp.experts.gate_up_proj[of] + 1e-3 * torch.randn_like(
            mlp.experts.gate_up_proj[of]
        )
        mlp.experts.down_proj[into] = mlp.experts.down_proj[of]
    return model


def _load(folder):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral", "gpt_oss", "qwen2_moe", "deepseek_v3"])
@pytest.mark.parametrize("by", ["merge", "prune"])
def test_the_slimmed_model_loads_in_transformers_with_k_experts_and_runs(kind, by, tmp_path):
    _moe(kind).save_pretrained(tmp_path / "in")
    k = 4 if kind == "deepseek_v3" else 2  # DeepSeek: 8 experts in 2 groups, top-2 from one group
    report = wl.slim_experts(tmp_path / "in", out=tmp_path / "out", experts=k, by=by)
    slim = _load(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    counts = [config[k] for k in ("num_experts", "num_local_experts", "n_routed_experts") if config.get(k) is not None]
    assert counts == [k]
    for layer in slim.model.layers:
        mlp = layer.mlp
        if hasattr(mlp, "experts"):  # DeepSeek's first layer is dense
            assert mlp.experts.gate_up_proj.shape[0] == k
            assert (getattr(mlp, "gate", None) or mlp.router).weight.shape[0] == k
    with torch.no_grad():
        assert torch.isfinite(slim(input_ids=torch.arange(8)[None]).logits).all()
    assert all(len(b.groups) == k for b in report.blocks)
    assert sorted(e for b in report.blocks[:1] for g in b.groups for e in g) == (
        list(range(report.blocks[0].experts)) if by == "merge" else sorted(g[0] for g in report.blocks[0].groups)
    )


def test_merging_averages_each_cluster_and_its_router_rows_and_keeps_the_others_as_they_were(tmp_path):
    model = _near_copy(_moe("qwen3_moe"))
    model.save_pretrained(tmp_path / "in")
    report = wl.slim_experts(tmp_path / "in", out=tmp_path / "out", experts=3)
    assert report.blocks[0].groups == [[0], [1, 3], [2]]
    assert report.blocks[0].cosine_within[1] > 0.99
    slim = _load(tmp_path / "out").model.layers[0].mlp
    mlp = model.model.layers[0].mlp
    with torch.no_grad():
        for out_e, members in enumerate(report.blocks[0].groups):
            for fused in ("gate_up_proj", "down_proj"):
                expected = getattr(mlp.experts, fused)[members].mean(0)
                torch.testing.assert_close(getattr(slim.experts, fused)[out_e], expected, rtol=0, atol=1e-7)
            torch.testing.assert_close(slim.gate.weight[out_e], mlp.gate.weight[members].mean(0), rtol=0, atol=1e-7)


def test_pruning_drops_the_weaker_of_the_two_most_alike_and_copies_the_rest_bit_for_bit(tmp_path):
    model = _near_copy(_moe("mixtral"))
    model.save_pretrained(tmp_path / "in")  # block_sparse_moe.experts.N.w1/w2/w3, renumbered in the output
    norms = model.model.layers[0].mlp.gate.weight.detach().norm(dim=1)
    weaker = 1 if norms[1] <= norms[3] else 3
    report = wl.slim_experts(tmp_path / "in", out=tmp_path / "out", experts=3, by="prune")
    assert report.blocks[0].dropped == [weaker]
    kept = [e for e in range(4) if e != weaker]
    saved, source = load_file(tmp_path / "out" / "model.safetensors"), load_file(tmp_path / "in" / "model.safetensors")
    prefix = "model.layers.0.block_sparse_moe"
    for out_e, e in enumerate(kept):
        for w in ("w1", "w2", "w3"):
            assert torch.equal(
                saved[f"{prefix}.experts.{out_e}.{w}.weight"], source[f"{prefix}.experts.{e}.{w}.weight"]
            )
    assert torch.equal(saved[f"{prefix}.gate.weight"], source[f"{prefix}.gate.weight"][kept])
    assert f"{prefix}.experts.3.w1.weight" not in saved


def test_a_model_in_memory_and_its_saved_copy_slim_to_the_same_weights(tmp_path):
    model = _near_copy(_moe("qwen2_moe"))
    model.save_pretrained(tmp_path / "in")
    wl.slim_experts(model, out=tmp_path / "from-memory", experts=2)
    wl.slim_experts(tmp_path / "in", out=tmp_path / "from-disk", experts=2)
    a = _load(tmp_path / "from-memory").state_dict()
    b = _load(tmp_path / "from-disk").state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-7, msg=key)


def test_what_cannot_be_slimmed_is_refused_in_one_line_and_nothing_is_written(tmp_path, zoo, capsys):
    _moe("qwen3_moe").save_pretrained(tmp_path / "in")
    for argv in (
        [str(tmp_path / "in"), "--experts", "1"],  # below the two experts each token is routed to
        [str(tmp_path / "in"), "--experts", "4"],  # nothing to slim
        [str(tmp_path / "in")],  # no --experts
        [str(zoo["llama"]), "--experts", "2"],  # no MoE block
    ):
        capsys.readouterr()
        with pytest.raises(SystemExit) as refused:
            main(["slim-experts", *argv, "-o", str(tmp_path / "out")])
        err = capsys.readouterr().err.strip()
        assert refused.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert not (tmp_path / "out").exists()
    with pytest.raises(WeightlabError, match="give out="):
        wl.slim_experts(tmp_path / "in", experts=2)
    _moe("deepseek_v3").save_pretrained(tmp_path / "deepseek")  # top-2 from 1 of 2 groups: 2 per group at least
    for k, says in ((3, "keep a multiple"), (2, "keep at least 4")):
        with pytest.raises(WeightlabError, match=says):
            wl.slim_experts(tmp_path / "deepseek", out=tmp_path / "never", experts=k)
    assert not (tmp_path / "never").exists()


def test_with_calibration_text_pruning_keeps_the_highest_reap_and_merging_weighs_by_routed_share(tmp_path):
    from test_experts_analysis import _texts

    from weightlab import synthetic

    model = _near_copy(_moe("qwen3_moe"))
    model.save_pretrained(tmp_path / "in")
    synthetic.tiny_tokenizer(tmp_path / "in", vocab=64)
    _texts(tmp_path / "texts.txt", n=40)
    measured = {b.block: b for b in wl.experts(tmp_path / "in", calibration=tmp_path / "texts.txt").blocks}
    pruned = wl.slim_experts(tmp_path / "in", out=tmp_path / "pruned", experts=2, by="prune",
                             calibration=tmp_path / "texts.txt")  # fmt: skip
    for b in pruned.blocks:
        score = [s if s is not None else -1.0 for s in measured[b.block].saliency]
        best = sorted(sorted(range(4), key=lambda e: (-score[e], e))[:2])
        assert [g[0] for g in b.groups] == best and b.calibrated
    merged = wl.slim_experts(tmp_path / "in", out=tmp_path / "merged", experts=3, calibration=tmp_path / "texts.txt")
    block = merged.blocks[0]
    share = measured["layers.0.mlp"].routed_share
    mlp, slim = model.model.layers[0].mlp, _load(tmp_path / "merged").model.layers[0].mlp
    for out_e, (members, weights) in enumerate(zip(block.groups, block.weights)):
        total = sum(share[e] for e in members)
        expected = [share[e] / total for e in members] if total else [1 / len(members)] * len(members)
        assert weights == pytest.approx(expected)
        with torch.no_grad():
            want = sum(w * mlp.experts.down_proj[e] for w, e in zip(weights, members))
            torch.testing.assert_close(slim.experts.down_proj[out_e], want, rtol=0, atol=1e-6)
    assert "REAP" in pruned.tables()[0].title and "routed share" in merged.tables()[0].title
