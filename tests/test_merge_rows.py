"""Large tensors of elementwise methods are merged a block of rows at a time: the same bytes as
the whole-tensor merge, a fraction of the memory; row reads and row writes on their own."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import weightlab.merging.run as run
from weightlab.errors import CorruptCheckpoint
from weightlab.io import CheckpointWriter, open_checkpoint
from weightlab.merging.config import MergeConfig


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("rows")
    gen = torch.Generator().manual_seed(0)
    shapes = {
        "model.embed_tokens.weight": (301, 16),
        "model.layers.0.mlp.up_proj.weight": (40, 16),
        "model.norm.weight": (16,),
        "lm_head.weight": (301, 16),
    }
    base = {n: torch.randn(s, generator=gen) for n, s in shapes.items()}
    save_file(base, root / "base.safetensors")
    for i in range(3):  # task vectors on a coarse grid: many ties at TIES's trim thresholds
        save_file(
            {n: t + torch.round(4 * torch.randn(t.shape, generator=gen)) / 16 for n, t in base.items()},
            root / f"ft{i}.safetensors",
        )
    return root


def merged_bytes(root, out, method, base="base", **extra) -> dict[str, torch.Tensor]:
    models = [str(root / f"ft{i}.safetensors") for i in range(2 if method == "slerp" else 3)]
    config = MergeConfig(
        method=method,
        base=str(root / f"{base}.safetensors") if base and method != "average" else None,
        models=models,
        **extra,
    )
    run.merge(config, out)
    return load_file(next(out.glob("*.safetensors")))


@pytest.mark.parametrize(
    "method,params,kept",
    [
        ("task-arithmetic", {}, True),
        ("average", {}, True),
        ("ties", {"density": 0.3}, True),
        ("ties", {"density": 0.3}, False),
    ],
)
def test_merging_in_row_blocks_gives_the_same_bytes(models, tmp_path, monkeypatch, method, params, kept):
    """Kept or not: a tensor read twice (TIES's statistics, then the merge) keeps its blocks as
    read when it fits KEPT_TENSOR_BYTES, else reads them again."""
    whole = merged_bytes(models, tmp_path / "whole", method, weights=[0.5, 1.0, 0.25], params=params)
    taken = []
    real_take = run.TensorWalk.take
    monkeypatch.setattr(run, "ROW_BLOCK_BYTES", 2000)  # blocks of 31 rows: only the 301-row tensors are split
    if not kept:
        monkeypatch.setattr(run, "KEPT_TENSOR_BYTES", 0)

    def take(self, wanted):
        got = real_take(self, wanted)
        taken.extend(got)
        return got

    monkeypatch.setattr(run.TensorWalk, "take", take)
    blocks = merged_bytes(models, tmp_path / "blocks", method, weights=[0.5, 1.0, 0.25], params=params)
    assert sorted(i.names[0] for i in taken) == ["lm_head.weight", "model.embed_tokens.weight"]
    assert whole.keys() == blocks.keys()
    for name in whole:
        assert torch.equal(whole[name].view(torch.int32), blocks[name].view(torch.int32)), name


def _rows_read(monkeypatch) -> list[tuple[str, int]]:
    """(tensor, rows) of every read from now on; a whole read counts as -1 rows."""
    from weightlab.io.checkpoint import Checkpoint

    reads: list[tuple[str, int]] = []
    real_get, real_rows = Checkpoint.get, Checkpoint.get_rows

    def get(self, name, *a, **k):
        reads.append((name, -1))
        return real_get(self, name, *a, **k)

    def get_rows(self, name, start, stop, *a, **k):
        reads.append((name, stop - start))
        return real_rows(self, name, start, stop, *a, **k)

    monkeypatch.setattr(Checkpoint, "get", get)
    monkeypatch.setattr(Checkpoint, "get_rows", get_rows)
    return reads


@pytest.mark.parametrize("method,params", [("ties", {"density": 0.3}), ("iso-c", {}), ("iso-cts", {})])
def test_statistics_of_a_split_tensor_are_read_a_block_at_a_time(models, tmp_path, monkeypatch, method, params):
    """At 7B, TIES's thresholds read the base and each model whole (2 GB at once for the
    embedding), Iso-C held n + 6 whole embeddings and Iso-CTS 11 GB of them in float64: all
    now read blocks of rows only."""
    monkeypatch.setattr(run, "ROW_BLOCK_BYTES", 2000)
    reads = _rows_read(monkeypatch)
    merged_bytes(models, tmp_path / "blocks", method, params=params)
    for name in ("lm_head.weight", "model.embed_tokens.weight"):
        rows = [n for tensor, n in reads if tensor == name]
        assert rows and max(rows) == 31 and -1 not in rows, name
        assert sum(rows) == 4 * 301, name  # each input's rows read once: kept as read for the passes after


def test_iso_c_of_a_tall_matrix_in_row_blocks_equals_the_whole(models, tmp_path, monkeypatch):
    """Iso-C's flat spectrum from the Gram matrix summed over blocks of rows: the whole-tensor
    merge to float32 rounding (the Gram sums in another order), and an SVD written here."""
    whole = merged_bytes(models, tmp_path / "whole", "iso-c", weights=[0.5, 1.0, 0.25])
    monkeypatch.setattr(run, "ROW_BLOCK_BYTES", 2000)
    blocks = merged_bytes(models, tmp_path / "blocks", "iso-c", weights=[0.5, 1.0, 0.25])
    base = load_file(models / "base.safetensors")
    fts = [load_file(models / f"ft{i}.safetensors") for i in range(3)]
    for name in whole:
        assert torch.allclose(whole[name], blocks[name], rtol=0, atol=1e-5), name
    name = "model.embed_tokens.weight"  # 301 × 16, tall, split
    delta = sum(c * (ft[name].double() - base[name].double()) for c, ft in zip([0.5, 1.0, 0.25], fts))
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    expected = base[name].double() + s.mean() * u @ vh
    assert torch.allclose(blocks[name].double(), expected, rtol=0, atol=2e-5)


def iso_cts_reference(base, fts, coeffs, common=0.8) -> torch.Tensor:
    """Iso-CTS as Alg. 1 of Marczak et al. 2025 reads, with float64 SVDs (the split of r as in
    `iso_cts`): an independent check of the Gram route."""
    mats = [c * (ft.double() - base.double()) for c, ft in zip(coeffs, fts)]
    r, n = min(mats[0].shape), len(mats)
    s = round((r - int(r * common)) / n)
    k = r - n * s
    u, sv, vh = torch.linalg.svd(sum(mats), full_matrices=False)
    us, sigmas, vs = [u[:, :k]], [sv[:k]], [vh[:k].T]
    for m in mats:
        ui, si, vhi = torch.linalg.svd(m - u[:, :k] @ (u[:, :k].T @ m), full_matrices=False)
        us.append(ui[:, :s])
        sigmas.append(si[:s])
        vs.append(vhi[:s].T)

    def polar(x):
        p, _, q = torch.linalg.svd(x, full_matrices=False)
        return p @ q

    return base.double() + torch.cat(sigmas).mean() * polar(torch.cat(us, 1)) @ polar(torch.cat(vs, 1)).T


def test_iso_cts_of_a_tall_matrix_in_row_blocks_equals_the_whole_and_the_paper(models, tmp_path, monkeypatch):
    """Iso-CTS by Gram matrices summed over blocks of rows (three passes, n×n matrices only): the
    whole-tensor merge, and Alg. 1 with float64 SVDs written here, to 1e-6.
    At 7B the whole route held the embedding's task vectors and SVDs in float64 (11 GB)."""
    coeffs = [0.5, 1.0, 0.25]
    whole = merged_bytes(models, tmp_path / "whole", "iso-cts", weights=coeffs)
    monkeypatch.setattr(run, "ROW_BLOCK_BYTES", 2000)
    reads = _rows_read(monkeypatch)
    blocks = merged_bytes(models, tmp_path / "blocks", "iso-cts", weights=coeffs)
    assert ("model.embed_tokens.weight", -1) not in reads
    base = load_file(models / "base.safetensors")
    fts = [load_file(models / f"ft{i}.safetensors") for i in range(3)]
    for name in whole:
        assert torch.allclose(whole[name], blocks[name], rtol=0, atol=1e-6), name
    for name in ("model.embed_tokens.weight", "lm_head.weight"):  # 301 × 16, tall, split
        expected = iso_cts_reference(base[name], [ft[name] for ft in fts], coeffs)
        assert torch.allclose(blocks[name].double(), expected, rtol=0, atol=1e-6), name


@pytest.mark.parametrize("shape", [(40, 40), (24, 70), (70, 24)])
def test_iso_cts_whole_by_gram_matrices_equals_alg_1_with_float64_svds(shape):
    """The whole route decomposes through Gram matrices too (a float32 SVD of a residual with
    r − k zero singular values failed to converge at 4096²): Alg. 1 to 1e-6, square, wide, tall."""
    from weightlab.merging.methods import METHODS

    gen = torch.Generator().manual_seed(3)
    base = torch.randn(shape, generator=gen)
    fts = [base + 0.1 * torch.randn(shape, generator=gen) for _ in range(3)]
    spec = METHODS["iso-cts"]
    merged = spec.fn(base, fts, torch.tensor([0.5, 1.0, 0.25]), spec.resolve({}), None)
    expected = iso_cts_reference(base, fts, [0.5, 1.0, 0.25])
    assert torch.allclose(merged.double(), expected, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def wide_and_square(tmp_path_factory):
    root = tmp_path_factory.mktemp("wide")
    gen = torch.Generator().manual_seed(5)
    shapes = {"model.layers.0.mlp.down_proj.weight": (40, 301), "model.layers.0.self_attn.o_proj.weight": (90, 90)}
    base = {n: torch.randn(s, generator=gen) for n, s in shapes.items()}
    save_file(base, root / "base.safetensors")
    for i in range(3):
        save_file(
            {n: t + 0.1 * torch.randn(t.shape, generator=gen) for n, t in base.items()}, root / f"ft{i}.safetensors"
        )
    return root


def test_iso_cts_of_wide_and_square_matrices_in_row_blocks_equals_alg_1(wide_and_square, tmp_path, monkeypatch):
    """A 7B down_proj (4096 × 11008) merged whole held 3.9 GB: wide and square matrices go by
    blocks of rows too (ΔΔᵀ from Δ gathered in float32, the residuals through the rest of its
    eigenbasis), to Alg. 1 in float64 within 1e-6."""
    coeffs = [0.5, 1.0, 0.25]
    whole = merged_bytes(wide_and_square, tmp_path / "whole", "iso-cts", weights=coeffs)
    monkeypatch.setattr(run, "ROW_BLOCK_BYTES", 2000)
    reads = _rows_read(monkeypatch)
    blocks = merged_bytes(wide_and_square, tmp_path / "blocks", "iso-cts", weights=coeffs)
    base = load_file(wide_and_square / "base.safetensors")
    fts = [load_file(wide_and_square / f"ft{i}.safetensors") for i in range(3)]
    for name in base:
        rows = [n for tensor, n in reads if tensor == name]
        assert rows and -1 not in rows and max(rows) < base[name].shape[0], name
        expected = iso_cts_reference(base[name], [ft[name] for ft in fts], coeffs)
        assert torch.allclose(blocks[name].double(), expected, rtol=0, atol=1e-6), name
        assert torch.allclose(whole[name].double(), expected, rtol=0, atol=1e-6), name


def test_iso_cts_in_row_blocks_leaves_out_directions_that_are_not_there(models, tmp_path, monkeypatch):
    """A fine-tune equal to the base has no direction of its own: its s columns of U_cat are
    zero, not arbitrary vectors an SVD would pick, and the merge stays finite."""
    import shutil

    copy = tmp_path / "models"
    shutil.copytree(models, copy)
    shutil.copy(copy / "base.safetensors", copy / "ft2.safetensors")
    monkeypatch.setattr(run, "ROW_BLOCK_BYTES", 2000)
    blocks = merged_bytes(copy, tmp_path / "blocks", "iso-cts", weights=[0.5, 1.0, 0.25])
    assert all(bool(torch.isfinite(t).all()) for t in blocks.values())
    base = load_file(copy / "base.safetensors")
    name = "model.embed_tokens.weight"
    update = blocks[name].double() - base[name].double()
    sv = torch.linalg.svdvals(update)
    assert int((sv > 1e-4 * sv[0]).sum()) == 15  # 16 directions less the one task 2 would have added


def test_wide_iso_cts_leaves_out_directions_that_are_not_there(wide_and_square, tmp_path, monkeypatch):
    import shutil

    copy = tmp_path / "models"
    shutil.copytree(wide_and_square, copy)
    shutil.copy(copy / "base.safetensors", copy / "ft2.safetensors")
    monkeypatch.setattr(run, "ROW_BLOCK_BYTES", 2000)
    blocks = merged_bytes(copy, tmp_path / "blocks", "iso-cts", weights=[0.5, 1.0, 0.25])
    base = load_file(copy / "base.safetensors")
    for name, r in (("model.layers.0.mlp.down_proj.weight", 40), ("model.layers.0.self_attn.o_proj.weight", 90)):
        sv = torch.linalg.svdvals(blocks[name].double() - base[name].double())
        s = round((r - int(0.8 * r)) / 3)  # each task's directions
        assert int((sv > 1e-4 * sv[0]).sum()) == r - s, name  # task 2's s directions are not there


def test_methods_that_need_the_whole_tensor_are_not_split(models, tmp_path, monkeypatch):
    monkeypatch.setattr(run, "ROW_BLOCK_BYTES", 64)
    calls = []
    monkeypatch.setattr(run, "_merge_in_rows", lambda *a, **k: calls.append(a))
    merged_bytes(models, tmp_path / "dare", "dare-linear", params={"density": 0.5})  # a seeded mask per tensor
    merged_bytes(models, tmp_path / "slerp", "slerp", base=None)  # norms of whole tensors
    merged_bytes(models, tmp_path / "nan", "task-arithmetic", coeff="nan")  # per-tensor norms need it whole
    assert calls == []


def test_reading_rows_reads_only_those_bytes(models):
    ckpt = open_checkpoint(models / "base.safetensors")
    whole = ckpt.get("model.embed_tokens.weight")
    before = ckpt.bytes_read
    rows = ckpt.get_rows("model.embed_tokens.weight", 100, 107, dtype=torch.float64)
    assert rows.dtype == torch.float64 and torch.equal(rows, whole[100:107].double())
    assert ckpt.bytes_read - before == 7 * 16 * 4


def test_rows_are_read_into_a_kept_buffer_when_one_is_given(models):
    """The executor reads each block into a buffer it keeps (no fresh pages): the rows are a view
    of it, the same values; a buffer too small, or not of bytes, is not used."""
    ckpt = open_checkpoint(models / "base.safetensors")
    name = "model.embed_tokens.weight"
    whole = ckpt.get(name)
    kept = torch.empty(7 * 16 * 4 + 5, dtype=torch.uint8)
    rows = ckpt.get_rows(name, 100, 107, into=kept)
    assert rows.data_ptr() == kept.data_ptr() and torch.equal(rows, whole[100:107])
    for unfit in (torch.empty(7 * 16 * 4 - 1, dtype=torch.uint8), torch.empty(7 * 16, dtype=torch.float32)):
        other = ckpt.get_rows(name, 100, 107, into=unfit)
        assert other.data_ptr() != unfit.data_ptr() and torch.equal(other, whole[100:107])


def test_a_truncated_file_is_reported_when_its_rows_are_read(models, tmp_path):
    data = (models / "base.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-200])
    with pytest.raises(CorruptCheckpoint):
        ckpt = open_checkpoint(tmp_path / "cut.safetensors")
        name = max(ckpt.names(), key=lambda n: ckpt.info(n).offset)
        ckpt.get_rows(name, ckpt.info(name).shape[0] - 1, ckpt.info(name).shape[0])


def test_row_writes_complete_a_planned_tensor_and_refuse_what_does_not_fit(tmp_path):
    plan = [("a", (5, 3), torch.float32), ("b", (2,), torch.float32)]
    values = torch.arange(15, dtype=torch.float32).reshape(5, 3)
    with CheckpointWriter(tmp_path / "out", plan=plan) as writer:
        writer.add_rows("a", 3, values[3:])
        with pytest.raises(Exception, match="do not fit"):
            writer.add_rows("a", 4, values[:2])
        with pytest.raises(Exception, match=r"non-finite|NaN|nan"):
            writer.add_rows("a", 0, torch.full((1, 3), float("nan")))
        writer.add_rows("a", 0, values[:3])
        writer.add("b", torch.ones(2))
    out = load_file(next((tmp_path / "out").glob("*.safetensors")))
    assert torch.equal(out["a"], values)


@pytest.mark.parametrize(
    "method,params", [("task-arithmetic", {}), ("ties", {"density": 0.3}), ("iso-c", {}), ("iso-cts", {})]
)
def test_bfloat16_models_are_merged_in_blocks_without_converted_copies(models, tmp_path, monkeypatch, method, params):
    """In row blocks the models stay bfloat16 (only the base is converted): τ = θ_i − θ_b promotes
    exactly, so the bytes are those of the whole-tensor merge, which converts every input."""
    bf16 = tmp_path / "bf16"
    bf16.mkdir()
    for name in ("base", "ft0", "ft1", "ft2"):
        tensors = load_file(models / f"{name}.safetensors")
        save_file({k: v.bfloat16() for k, v in tensors.items()}, bf16 / f"{name}.safetensors")
    whole = merged_bytes(bf16, tmp_path / "whole", method, weights=[0.5, 1.0, 0.25], params=params)
    monkeypatch.setattr(run, "ROW_BLOCK_BYTES", 1000)
    seen = []
    real = run.require_finite_input
    monkeypatch.setattr(run, "require_finite_input", lambda x, *a: seen.append(x.dtype) or real(x, *a))
    blocks = merged_bytes(bf16, tmp_path / "blocks", method, weights=[0.5, 1.0, 0.25], params=params)
    assert seen and set(seen) == {torch.bfloat16}  # checked as stored, before any conversion
    for name in whole:
        if method.startswith("iso-c"):
            assert torch.allclose(whole[name].float(), blocks[name].float(), rtol=0, atol=1e-2), name
        else:
            assert torch.equal(whole[name].view(torch.int16), blocks[name].view(torch.int16)), name


def test_ties_reads_a_tensor_too_large_to_keep_twice_and_no_more(models, tmp_path, monkeypatch):
    """Not kept (KEPT_TENSOR_BYTES = 0): the thresholds' pass and the merge's read every input's
    rows once each; looking at the first block to pick the kernels reads nothing extra."""
    monkeypatch.setattr(run, "ROW_BLOCK_BYTES", 2000)
    monkeypatch.setattr(run, "KEPT_TENSOR_BYTES", 0)
    reads = _rows_read(monkeypatch)
    merged_bytes(models, tmp_path / "blocks", "ties", params={"density": 0.3})
    for name in ("lm_head.weight", "model.embed_tokens.weight"):
        assert sum(n for tensor, n in reads if tensor == name) == 2 * 4 * 301, name
