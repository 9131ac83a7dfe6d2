"""--match-experts: MoE models whose experts were not kept in order are merged expert to matching
expert. A model merged with a copy of itself whose experts (and router rows) were permuted gives
the model back, in fused and per-expert layouts; without matching it does not."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_experts import _moe

import weightlab as wl
from weightlab.errors import WeightlabError

PERMS = {0: [2, 0, 3, 1], 1: [1, 3, 0, 2]}  # per layer: the copy's expert e is the model's expert PERMS[layer][e]


def _permuted(model):
    """A copy of an MoE model with each layer's experts and router rows reordered: the same function."""
    import copy

    twin = copy.deepcopy(model)
    with torch.no_grad():
        for layer, order in PERMS.items():
            mlp = twin.model.layers[layer].mlp
            router = getattr(mlp, "gate", None) or mlp.router
            for p in (mlp.experts.gate_up_proj, mlp.experts.down_proj, router.weight):
                p.copy_(p[order].clone())
            for name in ("gate_up_proj_bias", "down_proj_bias"):
                if hasattr(mlp.experts, name):
                    bias = getattr(mlp.experts, name)
                    bias.copy_(bias[order].clone())
            if getattr(router, "bias", None) is not None:
                router.bias.copy_(router.bias[order].clone())
    return twin


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss"])
def test_a_model_merged_with_its_permuted_copy_is_the_model_again(kind, tmp_path):
    from transformers import AutoModelForCausalLM

    model = _moe(kind)
    twin = _permuted(model)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(twin, ids), _logits(model, ids))  # the permutation is a symmetry
    matched = wl.merge(None, [model, twin], method="average", match_experts=True, out=tmp_path / "matched")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "matched")
    expected = {k: v for k, v in model.state_dict().items()}
    for key, value in merged.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)
    (orders,) = matched.expert_orders.values()  # the reference (the first model) is matched to itself
    for layer, order in PERMS.items():
        found = orders[f"layers.{layer}.mlp"]
        assert [order[e] for e in found["order"]] == [0, 1, 2, 3]  # the copy read in the model's order
        assert found["matched_cosine"] == pytest.approx(1.0) and found["index_cosine"] < 0.5
    record = yaml.safe_load((tmp_path / "matched" / "weightlab_merge.yml").read_text())
    assert record["match_experts"] is True
    wl.merge(None, [model, twin], method="average", out=tmp_path / "by-index")
    by_index = load_file(tmp_path / "by-index" / "model.safetensors")
    assert any(
        not torch.equal(by_index[k], v) for k, v in load_file(tmp_path / "matched" / "model.safetensors").items()
    )


def test_fine_tunes_saved_per_expert_merge_onto_their_base_expert_to_expert(tmp_path):
    """Mixtral saved by transformers (block_sparse_moe.experts.N.w1/w2/w3): task arithmetic of a
    fine-tune and its permuted copy at λ = 1/2 is the fine-tune, and computes what it computes."""
    from transformers import AutoModelForCausalLM

    base = _moe("mixtral")
    tuned = _moe("mixtral")
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.01 * torch.randn_like(p))
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "ft")
    _permuted(tuned).save_pretrained(tmp_path / "ft-permuted")
    report = wl.merge(
        tmp_path / "base",
        [tmp_path / "ft", tmp_path / "ft-permuted"],
        method="task-arithmetic",
        lam=0.5,
        match_experts=True,
        out=tmp_path / "merged",
    )
    assert any(o["order"] != [0, 1, 2, 3] for o in report.expert_orders[str(tmp_path / "ft-permuted")].values())
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_logits(merged, ids), _logits(tuned, ids), rtol=1e-5, atol=1e-5)


def test_matching_is_refused_where_it_cannot_apply(tmp_path, zoo):
    model = _moe("qwen3_moe")
    with pytest.raises(WeightlabError, match="no Mixture-of-Experts block"):
        wl.merge(None, [zoo["llama"], zoo["llama_ft"]], method="average", match_experts=True, out=tmp_path / "a")
    with pytest.raises(WeightlabError, match="does not apply to --as-adapter"):
        wl.merge(zoo["llama"], [zoo["llama_ft"]], method="task-arithmetic", as_adapter=True, match_experts=True)
    other = _moe("qwen2_moe")
    with pytest.raises(WeightlabError):
        wl.merge(None, [model, other], method="average", match_experts=True, out=tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
