"""The analysis driver: what it visits, how it batches, and planted answers at batch sizes 1 and 3
(batches above one are what a GPU runs; here the CPU runs the same batched code)."""

import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from weightlab.analysis.angles import AnglesOptions, angles
from weightlab.analysis.gaussian import GaussianOptions, gaussian
from weightlab.analysis.spectrum import SpectrumOptions, spectrum
from weightlab.analysis.tsd import TSDOptions, tsd
from weightlab.compute.device import Compute
from weightlab.compute.walk import Selection, TensorWalk, select
from weightlab.errors import CorruptCheckpoint
from weightlab.io import AdaptedCheckpoint, open_checkpoint, open_finetuned
from weightlab.io.adapter_writer import LoraFactors, write_adapter
from weightlab.surgery.lora import extract_lora

SAME_SHAPE = [f"layers.{i}.self_attn.q_proj.weight" for i in range(5)]  # five 24×16 matrices
ODD = "layers.2.mlp.up_proj.weight"  # one 30×16
ORDER = sorted([*SAME_SHAPE, ODD])  # the files' order: the odd one sits between same-shape ones


def cpu(batch: int) -> Compute:
    return Compute(torch.device("cpu"), torch.float64, batch)


def orthonormal(m: int, n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(m, n, generator=gen, dtype=torch.float64))[0]


def spread(m: int, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """W = U diag(σ) Vᵀ with σ_i = 10·0.8^i: well separated, so indices are unambiguous."""
    r = min(m, n)
    u, v = orthonormal(m, r, gen), orthonormal(n, r, gen)
    s = 10 * 0.8 ** torch.arange(r, dtype=torch.float64)
    return u @ torch.diag(s) @ v.T, u, s, v


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Matrix i of the five same-shape ones: W' = W + 0.2·σ_{i+1}·u_{i+1}v_{i+1}ᵀ. Then σ'_{i+1}/σ_{i+1} = 1.2
    (below σ_i/σ_{i+1} = 1.25, so the order holds), the one task-specific direction is i+1 with
    δ = 0.2, and ΔW has rank one with ‖ΔW‖ = 0.2σ_{i+1}.
    Fine-tune B moves the same matrices along a left vector turned by 10°·(i+1) from A's."""
    root = tmp_path_factory.mktemp("walk")
    gen = torch.Generator().manual_seed(7)
    base, a, b, facts = {}, {}, {}, {}
    for i, name in enumerate(SAME_SHAPE):
        w, u, s, v = spread(24, 16, gen)
        j = i + 1
        bump = 0.2 * s[j] * torch.outer(u[:, j], v[:, j])
        turn = math.radians(10 * (i + 1))
        other = u[:, 15]  # orthogonal to u_j
        turned = math.cos(turn) * u[:, j] + math.sin(turn) * other
        base[name], a[name], b[name] = w, w + bump, w + 0.2 * s[j] * torch.outer(turned, v[:, j])
        facts[name] = {"index": j, "sigma": float(s[j]), "angle": 10.0 * (i + 1)}
    w_odd = spread(30, 16, gen)[0]
    base[ODD] = a[ODD] = b[ODD] = w_odd
    for stem, weights in (("base", base), ("a", a), ("b", b)):
        save_file(weights, root / f"{stem}.safetensors")
    return root, facts


def open_all(root):
    return tuple(open_checkpoint(root / f"{s}.safetensors") for s in ("base", "a", "b"))


# ---- what the walk visits and how it batches ---------------------------------------------


def test_same_shape_tensors_batch_together_and_progress_counts_every_tensor(planted):
    root, _ = planted
    base, a, _ = open_all(root)
    walk = TensorWalk([base, a])
    started, advanced, sizes = [], [], []
    on_start = lambda count, nbytes=0: started.append((count, nbytes))
    on_progress = lambda count, nbytes=0: advanced.append((count, nbytes))
    for batch in walk.batches(cpu(3), on_start=on_start, on_progress=on_progress):
        assert len({item.shape for item in batch.items}) == 1
        assert all(t.shape[0] == len(batch.items) for t in batch.tensors)
        sizes.append(len(batch.items))
    total = sum(base.info(item.names[0]).nbytes + a.info(item.names[1]).nbytes for item in walk.items)
    assert started == [(6, total)] and sorted(sizes) == [1, 2, 3]
    assert sum(n for n, _ in advanced) == 6 and sum(b for _, b in advanced) == total  # bytes read, both sources


def test_selection_filters_by_name_shape_and_size(planted):
    root, _ = planted
    matched = TensorWalk(open_all(root)).matching.matched
    names = lambda sel: [i.names[0] for i in select(matched, sel)]
    assert names(Selection(include="up_proj")) == [ODD]
    assert names(Selection(exclude="q_proj")) == [ODD]
    assert names(Selection(min_elements=24 * 16 + 1)) == [ODD]
    assert names(Selection(names=frozenset(SAME_SHAPE[:2]))) == SAME_SHAPE[:2]


def test_adapter_rule_keeps_modules_any_or_every_fine_tune_changes(planted, tmp_path):
    root, _ = planted
    base = open_checkpoint(root / "base.safetensors")
    gen = torch.Generator().manual_seed(0)
    adapters = []
    for stem, modules in (("x", SAME_SHAPE[:3]), ("y", SAME_SHAPE[2:4])):
        write_adapter(
            tmp_path / stem,
            {
                m.removesuffix(".weight"): LoraFactors(
                    a=torch.randn(2, 16, generator=gen), b=torch.randn(24, 2, generator=gen)
                )
                for m in modules
            },
            scale=1.0,
            base_model="base",
        )
        adapters.append(open_finetuned(tmp_path / stem, base))
    assert all(isinstance(x, AdaptedCheckpoint) for x in adapters)
    visited = lambda **kw: [i.names[0] for i in TensorWalk([base, *adapters], **kw).items]
    assert visited(changed_by=adapters) == SAME_SHAPE[:4]
    assert visited(changed_by=adapters, every=True) == SAME_SHAPE[2:3]
    dense = open_checkpoint(root / "a.safetensors")
    assert len(visited(changed_by=[adapters[0], dense])) == 6  # a dense fine-tune may change anything
    walk = TensorWalk([base, adapters[0]], changed_by=[adapters[0]])
    for batch in walk.batches(cpu(3), factors=True):
        assert batch.tensors[1] is None  # the adapter is read as factors, never densified


def test_a_non_finite_value_in_a_batch_names_its_file_and_tensor(planted, tmp_path):
    root, _ = planted
    ckpt = open_checkpoint(root / "a.safetensors")
    bad = {n: ckpt.get(n) for n in ckpt.names()}
    bad[SAME_SHAPE[3]][2, 2] = float("nan")
    save_file(bad, tmp_path / "bad.safetensors")
    walk = TensorWalk([open_checkpoint(root / "base.safetensors"), open_checkpoint(tmp_path / "bad.safetensors")])
    with pytest.raises(CorruptCheckpoint, match=r"bad\.safetensors.*layers\.3\.self_attn\.q_proj\.weight.*NaN"):
        for _ in walk.batches(cpu(3)):
            pass


# ---- planted answers, the same at batch sizes 1 and 3 --------------------------------------


@pytest.mark.parametrize("batch", [1, 3])
def test_spectrum_finds_each_planted_amplification(planted, batch):
    root, facts = planted
    base, a, _ = open_all(root)
    result = spectrum(base, [a], SpectrumOptions(k=8), cpu(batch))
    assert [m.name for m in result.matrices] == ORDER  # tensor order, whatever the batching
    for m in (m for m in result.matrices if m.name != ODD):
        j = facts[m.name]["index"]
        expected = [1.0] * 8
        expected[j] = 1.2
        np.testing.assert_allclose(m.amplification, expected, rtol=1e-9)
        assert m.delta_rank90 == 1 and m.delta.spectral == pytest.approx(0.2 * facts[m.name]["sigma"], rel=1e-9)
    assert next(m for m in result.matrices if m.name == ODD).relative_change == 0


@pytest.mark.parametrize("batch", [1, 3])
def test_tsd_finds_each_planted_direction(planted, batch):
    root, facts = planted
    base, a, _ = open_all(root)
    result, vectors = tsd(base, a, TSDOptions(top=1), cpu(batch), keep_vectors=True)
    assert [m.name for m in result.matrices] == ORDER and list(vectors) == ORDER
    for m in (m for m in result.matrices if m.name != ODD):
        assert m.indices == [facts[m.name]["index"]] and m.rate == pytest.approx([0.2], rel=1e-9)


@pytest.mark.parametrize("batch", [1, 3])
def test_angles_find_each_planted_turn(planted, batch):
    root, facts = planted
    base, a, b = open_all(root)
    result = angles(a, b, base, AnglesOptions(k=4), cpu(batch))
    assert [m.name for m in result.matrices] == SAME_SHAPE  # the odd matrix is unchanged in both
    for m in result.matrices:
        assert m.k == 1 and m.angles_deg == pytest.approx([facts[m.name]["angle"]], abs=1e-6)


@pytest.mark.parametrize("batch", [1, 3])
def test_gaussian_moments_of_each_update_equal_numpy(planted, batch):
    root, _ = planted
    base, a, _ = open_all(root)
    result = gaussian(a, base, GaussianOptions(min_elements=1), cpu(batch))
    assert [t.name for t in result.tensors] == ORDER
    for t in (t for t in result.tensors if t.name != ODD):
        delta = (a.get(t.name) - base.get(t.name)).double().numpy()
        assert t.delta.std == pytest.approx(delta.std(), rel=1e-6) and t.delta.mean == pytest.approx(
            delta.mean(), abs=1e-9
        )


@pytest.mark.parametrize("batch", [1, 3])
def test_extract_lora_recovers_each_rank_one_update(planted, batch):
    root, _facts = planted
    base, a, _ = open_all(root)
    report, adapter = extract_lora(base, a, ORDER, rank=1, compute=cpu(batch))
    assert [m.name for m in report.modules] == SAME_SHAPE and report.skipped == [ODD]
    for m in report.modules:
        f = adapter.factors[m.name.removesuffix(".weight")]
        delta = a.get(m.name) - base.get(m.name)
        assert m.relative_error < 1e-6 and torch.allclose(f.b @ f.a, delta.to(f.a.dtype), atol=1e-5)


def test_batch_sizes_give_identical_results(planted):
    root, _ = planted
    base, a, b = open_all(root)
    one, three = (spectrum(base, [a, b], SpectrumOptions(), cpu(n)).to_dict() for n in (1, 3))
    assert [m["name"] for m in one["matrices"]] == [m["name"] for m in three["matrices"]]
    for x, y in zip(one["matrices"], three["matrices"]):
        np.testing.assert_allclose(x["sv_ft"], y["sv_ft"], rtol=1e-10)
        assert x["intruders"] == y["intruders"]


def test_read_ahead_stops_at_its_byte_budget(tmp_path, monkeypatch):
    """With a budget of one tensor, nothing is read ahead while a batch is in use: a large tensor
    (an embedding) is never held twice. With the default budget, small tensors are read ahead."""
    import time

    import weightlab.compute.stream as stream

    save_file({f"layers.{i}.w": torch.full((8, 8), float(i)) for i in range(6)}, tmp_path / "m.safetensors")

    def reads_at_each_batch() -> list[int]:
        ckpt = open_checkpoint(tmp_path / "m.safetensors")
        walk = TensorWalk([ckpt])
        seen = []
        for _ in walk.batches(Compute(torch.device("cpu"), torch.float32, 1)):
            time.sleep(0.05)  # time for the reader to run ahead, if it may
            seen.append(ckpt.bytes_read // 256)
        return seen

    assert max(n - i for i, n in enumerate(reads_at_each_batch())) > 1
    monkeypatch.setattr(stream, "READ_AHEAD_BYTES", 256)
    assert reads_at_each_batch() == [1, 2, 3, 4, 5, 6]
