"""`merge --dry-run` plans from headers and writes nothing; an output that cannot fit on its disk
is refused before a byte is written."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from weightlab.api import merge
from weightlab.compute.rows import ROW_BLOCK_BYTES
from weightlab.compute.stream import READ_AHEAD_BYTES
from weightlab.errors import WeightlabError
from weightlab.io import open_weights
from weightlab.io.atomic import free_bytes, require_free_space
from weightlab.io.writer import CheckpointWriter
from weightlab.merging.plan import PROCESS_BYTES


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A base and two fine-tunes with one 36 MB embedding (merged in row blocks by task arithmetic)."""
    root = tmp_path_factory.mktemp("plan")
    gen = torch.Generator().manual_seed(0)
    base = {
        "embed_tokens.weight": torch.randn(9000, 1024, generator=gen),
        "layers.0.mlp.up_proj.weight": torch.randn(64, 32, generator=gen),
        "layers.0.norm.weight": torch.ones(32),
        "position_ids": torch.arange(16),
    }
    folders = []
    for i in range(3):
        (root / f"m{i}").mkdir()
        shifted = {
            k: v + 0.01 * i * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
            for k, v in base.items()
        }
        save_file(shifted, root / f"m{i}" / "model.safetensors")
        folders.append(root / f"m{i}")
    return folders


def test_the_plan_is_what_the_merge_then_reads_and_writes(big, tmp_path):
    base, *models = big
    plan = merge(base, models, method="task-arithmetic", out=tmp_path / "out", dry_run=True, json=tmp_path / "p.json")
    assert not (tmp_path / "out").exists()  # nothing written but the plan's JSON
    assert json.loads((tmp_path / "p.json").read_text())["schema"] == "weightlab.merge-plan/1"
    assert (plan.merged, plan.in_row_blocks, plan.copied) == (3, 1, 1)
    merge(base, models, method="task-arithmetic", out=tmp_path / "out")
    written = open_weights(tmp_path / "out")
    assert plan.write_bytes == sum(written.info(n).nbytes for n in written.names())
    for path, nbytes in plan.read_bytes.items():
        ckpt = open_weights(path)
        assert nbytes == sum(ckpt.info(n).nbytes for n in ckpt.names())
    assert plan.free_bytes == pytest.approx(free_bytes(tmp_path), rel=0.05)


def test_the_estimate_follows_the_method(big, tmp_path):
    base, *models = big
    arithmetic = merge(base, models, method="task-arithmetic", out=tmp_path / "a", dry_run=True)
    iso = merge(base, models, method="iso-c", out=tmp_path / "b", dry_run=True)
    lines = merge(base, models, method="ties", lines=True, out=tmp_path / "c", dry_run=True)
    ties = merge(base, models, method="ties", out=tmp_path / "d", dry_run=True)
    # the tall embedding streams in row blocks, for iso-c too (its Gram matrix sums over blocks);
    # iso-c merges the rest whole, in float64
    assert arithmetic.largest_tensor == iso.largest_tensor == "layers.0.mlp.up_proj.weight"
    assert arithmetic.in_row_blocks == iso.in_row_blocks == 1 and ties.in_row_blocks == 1
    fixed = PROCESS_BYTES + READ_AHEAD_BYTES  # then (N + 2 + workspace) tensors: docs/merge.md's formula
    assert arithmetic.peak_memory_bytes == fixed + (2 * 3 + 2) * ROW_BLOCK_BYTES
    # what the statistics keep: TIES's counts in its CPU kernels (2^16 bins per model and block of
    # 16 MB of float32: three), three 1024² float64 matrices for iso-c; TIES's merged block; and,
    # as both read the tensor twice, the three inputs' embeddings as read (float32: 37 MB each)
    kept = 3 * 9000 * 1024 * 4
    assert ties.peak_memory_bytes == fixed + (2 * 3 + 2 + 1) * ROW_BLOCK_BYTES + 8 * 2**16 * 2 * 3 + kept
    assert iso.peak_memory_bytes == fixed + (2 * 3 + 2) * ROW_BLOCK_BYTES + 24 * 1024**2 + kept
    # Iso-CTS in row blocks too: seven matrices of 1024² in float64, and its merged block
    cts = merge(base, models, method="iso-cts", out=tmp_path / "e", dry_run=True)
    assert cts.in_row_blocks == 1
    assert cts.peak_memory_bytes >= fixed + (2 * 3 + 2 + 2) * ROW_BLOCK_BYTES + 7 * 8 * 1024**2
    assert lines.passes == 2 and lines.in_row_blocks == 0  # LiNeS needs the whole model's norms first


def test_dry_run_refusals(big, tmp_path, run_cli):
    base, *models = big
    with pytest.raises(WeightlabError, match=r"--dry-run plans a checkpoint"):
        merge(base, models, method="task-arithmetic", as_adapter=True, dry_run=True)
    code, out, err = run_cli("merge", "--method", "ties", "--base", base, *models, "-o", base, "--dry-run")
    assert code == 2 and "is the input" in err
    code, out, err = run_cli("merge", "--method", "ties", "--base", base, *models, "-o", tmp_path / "o", "--dry-run")
    assert code == 0 and "and write" in out and "estimated peak memory" in out and not (tmp_path / "o").exists()


def test_an_output_that_cannot_fit_is_refused_before_a_byte_is_written(tmp_path):
    with pytest.raises(WeightlabError, match="GB are free on its filesystem"):
        require_free_space(tmp_path, free_bytes(tmp_path) + (1 << 40), "the output")
    huge = [("w", (10**7, 10**6), torch.float32)]  # 40 TB
    with pytest.raises(WeightlabError, match=r"needs 40000\.00 GB"):
        with CheckpointWriter(tmp_path / "out", plan=huge):
            pass
    assert list(tmp_path.iterdir()) == []  # no output, no staging folder left behind


def test_what_statistics_keep_is_bounded_by_the_smaller_side():
    """TIES splits wide matrices too (a 7B down_proj, 4096 × 11008): the Gram-sized term is of
    the smaller side, as Iso-C splits only tall matrices (the plan said 3.9 GB for a 1.2 GB TIES)."""
    from weightlab.merging.plan import statistics_bytes

    assert statistics_bytes("iso-c", (4096, 11008), 3) == 24 * 4096**2
    assert statistics_bytes("ties", (32000, 4096), 3) == 6 * 32000 * 4096  # torch: one |τ| whole
    assert statistics_bytes("ties", (32000, 4096), 3, kernels=True) == 8 * 2**16 * 3 * 32  # counts: 50 MB
    assert statistics_bytes("iso-cts", (32000, 4096), 3) == 7 * 8 * 4096**2  # 0.94 GB, where whole: 11 GB
    wide = 12 * 4096 * 11008 + 8 * 3 * 4096 * 11008 // 5 + 24 * 4096**2  # a 7B down_proj: 1.2 GB
    assert statistics_bytes("iso-cts", (4096, 11008), 3) == wide
