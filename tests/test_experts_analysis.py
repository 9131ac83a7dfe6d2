"""`weightlab experts`: experts compared as experts, checked against plain computations on the
module's own parameters, on MoE models built by transformers' config classes, with planted near
copies and a fine-tune that moved one expert."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import shown_nan
from test_experts import _moe

import weightlab as wl
from weightlab.cli import main


def _plant_copy(model, layer: int, of: int, into: int, noise: float = 1e-3) -> None:
    experts = model.model.layers[layer].mlp.experts
    with torch.no_grad():
        experts.gate_up_proj[into] = experts.gate_up_proj[of] + noise * torch.randn_like(experts.gate_up_proj[of])
        experts.down_proj[into] = experts.down_proj[of]


def _plain_cosine(model, layer: int) -> np.ndarray:
    """cos of whole experts, from the fused parameters (every weight of an expert in one vector)."""
    experts = model.model.layers[layer].mlp.experts
    flat = torch.cat([experts.gate_up_proj.detach().flatten(1), experts.down_proj.detach().flatten(1)], 1).double()
    unit = flat / flat.norm(dim=1, keepdim=True)
    return (unit @ unit.T).numpy()


def _plain_overlap(a: torch.Tensor, b: torch.Tensor, side: str, k: int) -> float:
    def basis(w):
        u, _, vh = torch.linalg.svd(w.detach().double(), full_matrices=False)
        return (vh.T if side == "right" else u)[:, :k]

    return float((basis(a).T @ basis(b)).square().sum()) / k


def test_cosines_overlaps_and_router_equal_plain_computations_and_a_planted_copy_is_found():
    torch.manual_seed(3)
    model = _moe("qwen3_moe")
    _plant_copy(model, layer=0, of=1, into=3)
    result = wl.experts(model, top_k=4)
    by_block = {b.block: b for b in result.blocks}
    assert set(by_block) == {"layers.0.mlp", "layers.1.mlp"}
    for layer in (0, 1):
        b = by_block[f"layers.{layer}.mlp"]
        np.testing.assert_allclose(np.array(b.cosine), _plain_cosine(model, layer), atol=1e-12)
        gate = model.model.layers[layer].mlp.gate.weight.detach().double()
        np.testing.assert_allclose(b.router_norms, gate.norm(dim=1).numpy(), rtol=1e-12)
        experts = model.model.layers[layer].mlp.experts
        half = experts.gate_up_proj.shape[1] // 2
        e, f = 0, 2
        expected = np.mean(
            [
                _plain_overlap(experts.gate_up_proj[e][:half], experts.gate_up_proj[f][:half], "right", 4),
                _plain_overlap(experts.gate_up_proj[e][half:], experts.gate_up_proj[f][half:], "right", 4),
                _plain_overlap(experts.down_proj[e], experts.down_proj[f], "left", 4),
            ]
        )
        assert b.subspace_overlap[e][f] == pytest.approx(expected, abs=1e-9)
        assert b.random_overlap == pytest.approx(4 / 32)
    assert by_block["layers.0.mlp"].near_copies == [[1, 3]]
    assert by_block["layers.0.mlp"].subspace_overlap[1][3] > 0.99
    assert by_block["layers.1.mlp"].near_copies == []
    assert result.headline()[3][2].startswith("layers.0.mlp 1–3")


def test_fused_in_memory_and_mixtral_saved_per_expert_give_the_same_experts(tmp_path):
    model = _moe("mixtral")
    _plant_copy(model, layer=1, of=0, into=2)
    model.save_pretrained(tmp_path / "saved")  # block_sparse_moe.experts.N.w1/w2/w3
    fused, saved = wl.experts(model), wl.experts(tmp_path / "saved")
    assert [b.block for b in fused.blocks] == [b.block for b in saved.blocks]
    for a, b in zip(fused.blocks, saved.blocks):
        np.testing.assert_allclose(np.array(a.cosine), np.array(b.cosine), atol=1e-12)
        np.testing.assert_allclose(np.array(a.subspace_overlap), np.array(b.subspace_overlap), atol=1e-9)
        assert a.near_copies == b.near_copies and a.router_norms == pytest.approx(b.router_norms, rel=1e-12)
    assert saved.blocks[1].near_copies == [[0, 2]]


def test_against_a_base_only_the_expert_the_fine_tune_changed_moved():
    base, tuned = _moe("qwen2_moe"), _moe("qwen2_moe")
    experts = tuned.model.layers[1].mlp.experts
    with torch.no_grad():
        experts.down_proj[2] += 0.01 * torch.randn_like(experts.down_proj[2])
        tuned.model.layers[1].mlp.gate.weight[2] *= 1.5
    result = wl.experts(tuned, base=base)
    moved = {b.block: b.moved for b in result.blocks}
    assert moved["layers.0.mlp"] == [0, 0, 0, 0]
    assert [e for e, m in enumerate(moved["layers.1.mlp"]) if m] == [2]
    b0 = base.model.layers[1].mlp.experts
    with torch.no_grad():
        theta = torch.cat([b0.gate_up_proj[2].flatten(), b0.down_proj[2].flatten()]).double()
        delta = (experts.down_proj[2] - b0.down_proj[2]).double()
    assert moved["layers.1.mlp"][2] == pytest.approx(float(delta.norm() / theta.norm()), rel=1e-9)
    assert result.blocks[1].router_moved == pytest.approx([0, 0, 0.5, 0])
    assert result.blocks[0].shared == [
        *(f"model.layers.0.mlp.shared_expert.{p}_proj.weight" for p in ("down", "gate", "up")),
        "model.layers.0.mlp.shared_expert_gate.weight",
    ]


def test_the_command_writes_its_report_and_refuses_what_is_no_moe(tmp_path, zoo, capsys):
    model = _moe("qwen3_moe")
    _plant_copy(model, layer=0, of=0, into=1)
    model.save_pretrained(tmp_path / "moe")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as done:
        main(["experts", str(tmp_path / "moe"), "--json", str(out / "e.json"), "--report", str(out / "r.html"),
              "--plots", str(out / "plots")])  # fmt: skip
    assert done.value.code == 0
    payload = json.loads((out / "e.json").read_text())
    assert payload["schema"] == "weightlab.experts/1" and payload["blocks"][0]["near_copies"] == [[0, 1]]
    html = (out / "r.html").read_text()
    assert "near copies" in html and not shown_nan(html)
    assert {p.name for p in (out / "plots").glob("*.png")} == {"experts_cosine.png", "experts_router.png"}
    capsys.readouterr()
    for argv in (["experts", str(zoo["llama"])], ["experts", str(tmp_path / "moe"), "--base", str(zoo["llama"])]):
        with pytest.raises(SystemExit) as refused:
            main([*argv, "--json", str(tmp_path / "never.json")])
        assert refused.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "never.json").exists()


def _texts(path, n: int = 24) -> None:
    """Texts of the tiny tokenizer's words, of different lengths (so batches are padded)."""
    gen = torch.Generator().manual_seed(4)
    lines = [
        " ".join(
            f"w{int(w)}" for w in torch.randint(0, 60, (int(torch.randint(3, 12, (1,), generator=gen)),), generator=gen)
        )
        for _ in range(n)
    ]
    path.write_text("\n".join(lines) + "\n")


def _plain_routing(model, tokenizer_folder, text_file):
    """Routed counts and REAP saliency from the router's own outputs and the expert maths written
    out (SwiGLU with the fused weights), token by token over the real tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_folder)
    captured = {}

    def grab(layer):
        def hook(module, args, output):
            captured.setdefault(layer, []).append((args[0].reshape(-1, args[0].shape[-1]), output[1], output[2]))

        return hook

    handles = [layer.mlp.gate.register_forward_hook(grab(i)) for i, layer in enumerate(model.model.layers)]
    texts = text_file.read_text().splitlines()
    masks = []
    with torch.no_grad():
        for start in range(0, len(texts), 16):
            batch = tok(texts[start : start + 16], padding=True, return_tensors="pt")
            masks.append(batch["attention_mask"].reshape(-1).bool())
            model(**batch)
    for h in handles:
        h.remove()
    out = {}
    for layer, calls in captured.items():
        experts = model.model.layers[layer].mlp.experts
        n = experts.gate_up_proj.shape[0]
        counts, sums = [0] * n, [0.0] * n
        for (x, scores, index), mask in zip(calls, masks):
            for t in torch.nonzero(mask).ravel().tolist():
                for slot, e in enumerate(index[t].tolist()):
                    gate, up = (experts.gate_up_proj[e] @ x[t]).chunk(2)
                    y = experts.down_proj[e] @ (torch.nn.functional.silu(gate) * up)
                    counts[e] += 1
                    sums[e] += float(scores[t, slot]) * float(y.norm())
        out[f"layers.{layer}.mlp"] = (counts, [s / c if c else None for s, c in zip(sums, counts)])
    return out


def test_routing_and_reap_equal_a_plain_loop_over_the_routers_own_choices(tmp_path):
    from weightlab import synthetic

    model = _moe("qwen3_moe")
    synthetic.tiny_tokenizer(tmp_path / "tok", vocab=64)
    _texts(tmp_path / "texts.txt")
    result = wl.experts(model, calibration=tmp_path / "texts.txt", tokenizer=tmp_path / "tok")
    expected = _plain_routing(model, tmp_path / "tok", tmp_path / "texts.txt")
    for b in result.blocks:
        counts, saliency = expected[b.block]
        assert b.tokens == sum(counts) // 2  # two experts per token
        assert b.routed_share == pytest.approx([c / sum(counts) for c in counts], abs=0)
        for got, want in zip(b.saliency, saliency):
            assert (got is None) == (want is None) and (got is None or got == pytest.approx(want, rel=1e-4))
    assert {"routed_share", "reap_saliency"} <= set(result.rows()[0])


def test_per_expert_saved_and_fused_in_memory_route_alike(tmp_path):
    """Mixtral saved per expert (w1/w2/w3) is run as transformers builds it (fused experts,
    assembled from the saved ones): the same routing as the module in memory."""
    from weightlab import synthetic

    model = _moe("mixtral")
    model.save_pretrained(tmp_path / "saved")
    synthetic.tiny_tokenizer(tmp_path / "saved", vocab=64)
    _texts(tmp_path / "texts.txt")
    saved = wl.experts(tmp_path / "saved", calibration=tmp_path / "texts.txt")
    memory = wl.experts(model, calibration=tmp_path / "texts.txt", tokenizer=tmp_path / "saved")
    for a, b in zip(saved.blocks, memory.blocks):
        assert a.routed_share == b.routed_share and a.tokens == b.tokens
        assert a.saliency == pytest.approx(b.saliency, rel=1e-6)


@pytest.mark.parametrize("damage", ["hole", "shape"])
def test_a_block_whose_experts_do_not_line_up_is_refused_by_name(damage, tmp_path, capsys):
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    tensors = {
        f"model.layers.0.mlp.experts.{e}.{part}.weight": torch.randn(8, 6, generator=gen)
        for e in (0, 1, 2)
        for part in ("gate_proj", "up_proj")
    }
    if damage == "hole":
        del tensors["model.layers.0.mlp.experts.1.up_proj.weight"]
    else:
        tensors["model.layers.0.mlp.experts.2.gate_proj.weight"] = torch.randn(8, 5, generator=gen)
    (tmp_path / "moe").mkdir()
    save_file(tensors, tmp_path / "moe" / "model.safetensors")
    with pytest.raises(SystemExit) as refused:
        main(["experts", str(tmp_path / "moe")])
    err = capsys.readouterr().err.strip()
    assert refused.value.code == 2 and len(err.splitlines()) == 1 and "layers.0.mlp" in err, err
