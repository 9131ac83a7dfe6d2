"""`compare`: planted banks of fine-tunes give known cosines, overlaps, sign conflicts and norm
ratios; sign conflicts equal a plain loop over TIES's own trimming; adapters equal their merged
checkpoints; the CLI writes every output and the report rebuilds from the JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from weightlab.analysis.compare import CompareOptions, compare
from weightlab.compute.trim import trim_top_magnitude
from weightlab.io import open_checkpoint, open_finetuned

NAMES = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight", "model.norm.weight"]
SHAPES = [(48, 32), (64, 32), (32,)]


def low_rank(shape, seed, rank=3):
    gen = torch.Generator().manual_seed(seed)
    if len(shape) == 1:
        return torch.randn(shape, generator=gen)
    return torch.randn(shape[0], rank, generator=gen) @ torch.randn(rank, shape[1], generator=gen) / rank


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    """0: base + τ; 1: the same τ; 2: −τ; 3: an independent σ; 4: 2τ."""
    root = tmp_path_factory.mktemp("bank")
    gen = torch.Generator().manual_seed(0)
    base = {n: torch.randn(s, generator=gen) for n, s in zip(NAMES, SHAPES)}
    tau = {n: 0.01 * low_rank(s, 10 + i) for i, (n, s) in enumerate(zip(NAMES, SHAPES))}
    sigma = {n: 0.01 * low_rank(s, 20 + i) for i, (n, s) in enumerate(zip(NAMES, SHAPES))}
    save_file(base, root / "base.safetensors")
    deltas = [tau, tau, {n: -t for n, t in tau.items()}, sigma, {n: 2 * t for n, t in tau.items()}]
    for i, delta in enumerate(deltas):
        save_file({n: base[n] + delta[n] for n in NAMES}, root / f"ft{i}.safetensors")
    return root, base, deltas


def run(root, n=5, **options):
    return compare(
        open_checkpoint(root / "base.safetensors"),
        [open_checkpoint(root / f"ft{i}.safetensors") for i in range(n)],
        CompareOptions(**options),
    )


def test_planted_bank_gives_known_answers(bank):
    root, base, deltas = bank
    result = run(root)
    cos, overlap, conflict = result.overall.cosine, result.overall.subspace_overlap, result.overall.sign_conflict
    for i, j in [(0, 1), (0, 4), (1, 4)]:
        assert cos[i][j] == pytest.approx(1, abs=1e-5) and overlap[i][j] == pytest.approx(1, abs=1e-5)
    assert cos[0][2] == pytest.approx(-1, abs=1e-5) and overlap[0][2] == pytest.approx(1, abs=1e-5)
    assert conflict[0][1] == pytest.approx(0, abs=1e-3) and conflict[0][2] == pytest.approx(1, abs=1e-3)
    # the independent fine-tune: the plain formula, computed here from the float32 differences
    flat = [torch.cat([(base[n] + d[n] - base[n]).reshape(-1).double() for n in NAMES]) for d in deltas]
    assert cos[0][3] == pytest.approx(float(flat[0] @ flat[3] / (flat[0].norm() * flat[3].norm())), abs=1e-6)
    assert result.norms[4] / result.norms[0] == pytest.approx(2, rel=1e-5)
    assert {p["a"]: p["norm_ratio"] for p in result.pairs() if p["b"] == 4}[0] == pytest.approx(0.5, rel=1e-5)
    assert result.matrices == 2 and result.tensors == 3
    # 0, 1, 4 agree: clustering puts them side by side
    order = result.order
    assert sorted(order) == list(range(5))
    positions = sorted(order.index(i) for i in (0, 1, 4))
    assert positions[-1] - positions[0] == 2


def test_sign_conflict_equals_a_plain_loop_over_ties_trimming(bank):
    root, base, deltas = bank
    result = run(root, n=4, density=0.3)
    for i, j in [(0, 3), (2, 3), (0, 2)]:
        both = differ = 0
        for name in NAMES:
            a = trim_top_magnitude((base[name] + deltas[i][name] - base[name]).reshape(-1), 0.3)
            b = trim_top_magnitude((base[name] + deltas[j][name] - base[name]).reshape(-1), 0.3)
            kept = (a != 0) & (b != 0)
            both += int(kept.sum())
            differ += int((kept & (torch.sign(a) != torch.sign(b))).sum())
        assert result.overall.sign_conflict[i][j] == pytest.approx(differ / both, abs=1e-12)


def test_per_layer_cosines_and_overlaps_by_hand(bank):
    root, base, deltas = bank
    result = run(root, n=4, k=2)
    by_layer = {layer.layer: layer for layer in result.layers}
    assert set(by_layer) == {0, 1, None}
    name = NAMES[1]  # layer 1 holds one matrix
    t0, t3 = ((base[name] + deltas[i][name] - base[name]).double() for i in (0, 3))
    assert by_layer[1].cosine[0][3] == pytest.approx(float((t0 * t3).sum() / (t0.norm() * t3.norm())), abs=1e-7)
    u0, u3 = (np.linalg.svd(t.numpy())[0][:, :2] for t in (t0, t3))
    assert by_layer[1].subspace_overlap[0][3] == pytest.approx(np.sum((u0.T @ u3) ** 2) / 2, abs=1e-6)
    assert by_layer[None].subspace_overlap[0][3] is None  # a norm vector has no subspace


def test_an_adapter_compares_like_its_merged_checkpoint(zoo, adapters, tmp_path):
    from peft import PeftModel
    from transformers import AutoModel

    merged = PeftModel.from_pretrained(AutoModel.from_pretrained(zoo["llama"]), adapters["llama"]).merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    base = open_checkpoint(zoo["llama"])
    ft = open_checkpoint(zoo["llama_ft"])
    via_adapter = compare(base, [ft, open_finetuned(adapters["llama"], base)])
    dense = compare(base, [ft, open_checkpoint(tmp_path / "merged")])
    assert via_adapter.overall.cosine[0][1] == pytest.approx(dense.overall.cosine[0][1], abs=1e-3)
    assert via_adapter.norms[1] == pytest.approx(dense.norms[1], rel=1e-3)
    assert via_adapter.overall.subspace_overlap[0][1] == pytest.approx(dense.overall.subspace_overlap[0][1], abs=1e-3)


def test_compare_cli_outputs_and_report(bank, run_cli, tmp_path):
    root, _, _ = bank
    out = tmp_path / "out"
    fts = [str(root / f"ft{i}.safetensors") for i in range(5)]
    code, _stdout, stderr = run_cli(
        "compare",
        "--base",
        str(root / "base.safetensors"),
        *fts,
        "--json",
        str(out / "c.json"),
        "--csv",
        str(out / "c.csv"),
        "--plots",
        str(out / "plots"),
        "--report",
        str(out / "r.html"),
    )
    assert code == 0, stderr
    payload = json.loads((out / "c.json").read_text())
    assert payload["schema"] == "weightlab.compare/1" and len(payload["pairs"]) == 10
    assert (out / "c.csv").read_text().count("\n") == 11
    assert {p.name for p in (out / "plots").glob("*.png")} == {"compare_heatmaps.png", "compare_layers.png"}
    assert "Compare" in (out / "r.html").read_text()
    assert run_cli("report", str(out / "c.json"), "-o", str(tmp_path / "again.html"))[0] == 0
    code, _, stderr = run_cli("compare", "--base", str(root / "base.safetensors"), fts[0])
    assert code == 2 and "at least two" in stderr


def test_a_bank_that_does_not_match_is_named_not_silently_narrowed(zoo, tmp_path, run_cli):
    """A fine-tune lacking a matrix: the note names it and the model, and the figures say over how
    many tensors and parameters they were computed; a fine-tune of another model is refused."""
    from safetensors.torch import load_file, save_file

    from weightlab.errors import InvalidArgument

    (tmp_path / "lacking").mkdir()
    tensors = load_file(zoo["llama_ft"] / "model.safetensors")
    del tensors["layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "lacking" / "model.safetensors")
    base = open_checkpoint(zoo["llama"])
    result = compare(base, [open_checkpoint(zoo["llama_ft"]), open_checkpoint(tmp_path / "lacking")])
    assert result.problems == [
        f"1 tensor missing from {tmp_path / 'lacking'}, so left out for every model: layers.1.mlp.up_proj.weight"
    ]
    compared = [n for n in base.names() if n != "layers.1.mlp.up_proj.weight"]
    assert result.tensors == len(compared)
    assert result.parameters == sum(base.get(n).numel() for n in compared)
    assert f"over {len(compared)} tensors ({result.parameters:,} parameters)" in result.tables()[0].title
    code, _, err = run_cli(
        "compare", "--base", zoo["llama"], zoo["llama_ft"], tmp_path / "lacking", "--json", tmp_path / "c.json"
    )
    assert code == 0 and "missing from" in err and "lacking" in err
    assert json.loads((tmp_path / "c.json").read_text())["parameters"] == result.parameters
    with pytest.raises(InvalidArgument, match="shares no tensor name"):
        compare(base, [open_checkpoint(zoo["llama_ft"]), open_checkpoint(zoo["bert"])])


@pytest.mark.parametrize("density", [0.3, 1.0])
def test_large_tall_matrices_are_read_in_row_blocks_with_the_same_answers(bank, monkeypatch, density):
    """At 7B, whole embeddings of n + 1 models and their task vectors do not fit the memory goal:
    tall matrices over twice the block size are read a block of rows at a time, in two passes, and
    give what the whole-tensor path gives (sign counts exactly)."""
    from weightlab.analysis import compare as module
    from weightlab.io.checkpoint import Checkpoint

    root = bank[0]
    whole = run(root, density=density, k=2)
    monkeypatch.setattr(module, "ROW_BLOCK_BYTES", 1000)  # q (48×32) and up (64×32) float32: blocks of 7 rows
    reads: list[tuple[str, int]] = []
    real_get, real_rows = Checkpoint.get, Checkpoint.get_rows
    monkeypatch.setattr(
        Checkpoint, "get", lambda self, name, *a, **k: reads.append((name, -1)) or real_get(self, name, *a, **k)
    )

    def get_rows(self, name, start, stop, *a, **k):
        reads.append((name, stop - start))
        return real_rows(self, name, start, stop, *a, **k)

    monkeypatch.setattr(Checkpoint, "get_rows", get_rows)
    blocks = run(root, density=density, k=2)
    for name in NAMES[:2]:
        rows = [n for tensor, n in reads if tensor == name]
        assert rows and max(rows) == 7, name  # never the whole tensor
    assert blocks.tensors == whole.tensors == 3 and blocks.matrices == whole.matrices == 2
    assert blocks.parameters == whole.parameters
    assert blocks.norms == pytest.approx(whole.norms, rel=1e-12)
    for a, b in zip([blocks.overall, *blocks.layers], [whole.overall, *whole.layers]):
        assert np.allclose(np.array(a.cosine, float), np.array(b.cosine, float), atol=1e-12, equal_nan=True)
        assert np.allclose(
            np.array(a.subspace_overlap, float), np.array(b.subspace_overlap, float), atol=1e-9, equal_nan=True
        )
        assert a.sign_conflict == b.sign_conflict
