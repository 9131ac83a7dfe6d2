"""`spectrum`'s fast route (Gram values, certified top-k, cached base) against the definition
computed with float64 LAPACK SVDs of the same float32 matrices; the persistent base cache;
`--values-only`."""

from __future__ import annotations

import json
import logging
import os
import threading

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import weightlab.compute.spectra as spectrum_mod
from weightlab.analysis.spectrum import SpectrumOptions, spectrum
from weightlab.compute.cache import DecompositionCache, content_key
from weightlab.compute.gram import decompose
from weightlab.display import human_bytes
from weightlab.io import open_checkpoint

SHAPES = {
    "layers.0.attn.q_proj.weight": (60, 60),
    "layers.0.mlp.up_proj.weight": (120, 48),
    "layers.0.mlp.down_proj.weight": (48, 120),
    "layers.1.mlp.up_proj.weight": (120, 48),
}


def decaying(m: int, n: int, seed: int, null: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    r = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64))
    s = 3 * 0.93 ** torch.arange(r, dtype=torch.float64)
    if null:
        s[-null:] = 0  # numerically rank-deficient: the fallback decides these u_j
    return (u * s) @ v.T


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("route")
    base, ft = {}, {}
    for i, (name, shape) in enumerate(SHAPES.items()):
        w = decaying(*shape, seed=i, null=6 if name.startswith("layers.1") else 0)
        gen = torch.Generator().manual_seed(100 + i)
        lora = torch.randn(shape[0], 2, generator=gen, dtype=torch.float64) @ torch.randn(
            2, shape[1], generator=gen, dtype=torch.float64
        )
        base[name] = w.float()
        ft[name] = (
            w + 0.01 * torch.randn(shape, generator=gen, dtype=torch.float64) + 0.15 * lora / lora.norm()
        ).float()
    save_file(base, root / "base.safetensors")
    save_file(ft, root / "ft.safetensors")
    return root, base, ft


def reference(w: torch.Tensor, w_ft: torch.Tensor, k: int, kk: int) -> dict:
    """The definitions in analysis/spectrum.py's docstring, with full float64 SVDs."""
    u, s, vh = np.linalg.svd(w.double().numpy(), full_matrices=False)
    u2, s2, vh2 = np.linalg.svd(w_ft.double().numpy(), full_matrices=False)
    d = np.linalg.svd((w_ft.double() - w.double()).numpy(), compute_uv=False)
    cos = np.abs(u2[:, :kk].T @ u)
    energy = np.cumsum(d**2) / np.sum(d**2)
    return {
        "amplification": s2[:k] / s[:k],
        "u_alignment": np.diag(cos[:k, :k]),
        "v_alignment": np.abs(np.sum(vh2[:k] * vh[:k], 1)),
        "best_match_cos": cos.max(1),
        "best_match_index": cos.argmax(1),
        "subspace_similarity": np.sum(cos[:k, :k] ** 2) / k,
        "sv_base": s,
        "sv_ft": s2,
        "delta_rank90": int(np.argmax(energy >= 0.9) + 1),
        "topk_change_share": np.abs(s2 - s)[:k].sum() / np.abs(s2 - s).sum(),
    }


def test_fast_route_equals_the_svd_definition_within_tolerance(pair):
    """Cosines to 1e-6 (certified vectors; float32-rounded cached base vectors); values to 1e-7
    relative, or 1e-7·σ₁ absolute below √ε₆₄·σ₁ (where float32 storage of W already blurs them)."""
    root, base, ft = pair
    result = spectrum(
        open_checkpoint(root / "base.safetensors"),
        [open_checkpoint(root / "ft.safetensors")],
        SpectrumOptions(k=8, intruder_k=10),
    )
    assert len(result.matrices) == len(SHAPES)
    for m in result.matrices:
        ref = reference(base[m.name], ft[m.name], 8, 10)
        for field in ("amplification", "sv_base", "sv_ft"):
            np.testing.assert_allclose(getattr(m, field), ref[field], rtol=1e-7, atol=1e-7 * ref["sv_base"][0])
        for field in ("u_alignment", "v_alignment", "best_match_cos"):
            np.testing.assert_allclose(getattr(m, field), ref[field], atol=1e-6, err_msg=f"{m.name} {field}")
        assert m.subspace_similarity == pytest.approx(ref["subspace_similarity"], abs=1e-6)
        assert m.topk_change_share == pytest.approx(ref["topk_change_share"], rel=1e-6)
        assert m.delta_rank90 == ref["delta_rank90"]
        clear = ref["best_match_cos"] > 0.05  # where the best match is not a near-tie of tiny cosines
        assert np.array_equal(np.asarray(m.best_match_index)[clear], ref["best_match_index"][clear])


@pytest.mark.parametrize("shape", [(240, 160), (160, 240), (200, 200)])
def test_large_matrices_certify_best_matches_among_the_top_base_vectors(shape, tmp_path, monkeypatch):
    """r ≥ 66: the base is decomposed for its top 32 vectors only. A small dense change keeps every
    u'_i matched inside them (no full decomposition); a strong rank-2 update makes intruders,
    whose best match needs every base vector (one full decomposition). Both equal the definition."""
    w = decaying(*shape, seed=11)
    gen = torch.Generator().manual_seed(12)
    small = w + 0.002 * torch.randn(shape, generator=gen, dtype=torch.float64)
    lora = torch.randn(shape[0], 2, generator=gen, dtype=torch.float64) @ torch.randn(
        2, shape[1], generator=gen, dtype=torch.float64
    )
    intruded = w + 4 * lora / lora.norm()
    name = "layers.0.mlp.up_proj.weight"
    for label, tensor in (("base", w), ("small", small), ("intruded", intruded)):
        save_file({name: tensor.float()}, tmp_path / f"{label}.safetensors")
    columns = []
    real = spectrum_mod.decompose
    stored = w.float()

    def counted(m, c=None):  # the base's decompositions (the fine-tune's and the update's are others)
        columns.extend([c] if torch.equal(m, stored) else [])
        return real(m, c)

    monkeypatch.setattr(spectrum_mod, "decompose", counted)
    base = open_checkpoint(tmp_path / "base.safetensors")
    for label, full_decompositions in (("small", 0), ("intruded", 1)):
        columns.clear()
        m = spectrum(base, [open_checkpoint(tmp_path / f"{label}.safetensors")]).matrices[0]
        assert columns == [32] + [None] * full_decompositions, label
        ref = reference(w.float(), (small if label == "small" else intruded).float(), 8, 10)
        for field in ("u_alignment", "v_alignment", "best_match_cos"):
            np.testing.assert_allclose(getattr(m, field), ref[field], atol=1e-6, err_msg=f"{label} {field}")
        assert m.best_match_index == ref["best_match_index"].tolist()
        assert m.intruders == [i for i, c in enumerate(ref["best_match_cos"]) if c < 0.5]
        assert (min(m.best_match_cos) < 0.9) if label == "intruded" else (min(m.best_match_cos) > 0.99)


def test_a_warm_cache_skips_every_decomposition_and_gives_the_same_bytes(pair, tmp_path, monkeypatch):
    """The base's top vectors, the fine-tune's top triplets and the update's values are all read
    back: a warm run decomposes nothing (it used to redo the fine-tune's and the update's, two
    thirds of a cold run's work at 7B shapes)."""
    root, _, _ = pair
    cache = DecompositionCache(tmp_path / "cache")
    calls = []
    real = spectrum_mod.decompose
    monkeypatch.setattr(spectrum_mod, "decompose", lambda w, columns=None: calls.append(1) or real(w, columns))

    def run() -> str:
        result = spectrum(
            open_checkpoint(root / "base.safetensors"), [open_checkpoint(root / "ft.safetensors")], cache=cache
        )
        return json.dumps(result.to_dict())

    cold = run()
    assert len(calls) == 3 * len(SHAPES) and len(cache.entries()) == 3 * len(SHAPES)
    warm = run()
    assert len(calls) == 3 * len(SHAPES)  # nothing decomposed the second time
    assert warm == cold
    assert (
        json.dumps(
            spectrum(open_checkpoint(root / "base.safetensors"), [open_checkpoint(root / "ft.safetensors")]).to_dict()
        )
        == cold
    )  # and no cache at all: the same bytes too


def test_cache_keys_follow_content_and_damaged_entries_are_misses(tmp_path):
    w = decaying(30, 20, seed=7).float()
    cache = DecompositionCache(tmp_path)
    key = content_key(w)
    assert key == content_key(w.clone()) and key != content_key(w.double())
    edited = w.clone()
    edited[3, 4] += 1e-6
    assert content_key(edited) != key
    assert cache.get(key, tuple(w.shape), None) is None
    cache.put(key, decompose(w))
    assert cache.get(key, tuple(w.shape), None) is not None
    cache.path(key).write_bytes(cache.path(key).read_bytes()[:100])  # truncated by a crash or a full disk
    assert cache.get(key, tuple(w.shape), None) is None


def test_cache_evicts_least_recently_used_entries_beyond_its_bound(tmp_path):
    spectra = [(content_key(w), decompose(w)) for w in (decaying(40, 40, seed=s).float() for s in range(4))]
    probe = DecompositionCache(tmp_path / "probe")
    probe.put(*spectra[0])
    size = probe.path(spectra[0][0]).stat().st_size
    cache = DecompositionCache(tmp_path / "cache", max_bytes=2 * size)
    for i, (key, spec) in enumerate(spectra):
        cache.put(key, spec)
        os.utime(cache.path(key), (1e9 + i, 1e9 + i))  # distinct times, oldest first
    assert cache.get(spectra[2][0], (40, 40), None) is not None  # a hit refreshes the entry
    cache.put(*spectra[0])
    kept = {p.name.split(".")[0] for _, _, p in cache.entries()}
    assert kept == {spectra[2][0], spectra[0][0]}


def test_a_run_that_outgrows_the_cache_keeps_what_came_first_instead_of_evicting_its_own(tmp_path, caplog):
    """A pass over more base matrices than the bound holds used to evict each entry before its
    reuse (least recently used is the next one needed), so a second run hit nothing: now a run
    never evicts its own entries, keeps the first ones, says once that the cache is full, and
    the next run hits them."""
    spectra = [(content_key(w), decompose(w)) for w in (decaying(40, 40, seed=s).float() for s in range(4))]
    probe = DecompositionCache(tmp_path / "probe")
    probe.put(*spectra[0])
    size = probe.path(spectra[0][0]).stat().st_size
    first = DecompositionCache(tmp_path / "cache", max_bytes=2 * size)
    library_log = logging.getLogger("weightlab")  # the CLI stops it propagating: listen on it directly, alone
    library_log.addHandler(caplog.handler)
    propagate, library_log.propagate = library_log.propagate, False
    try:
        with caplog.at_level("WARNING", logger="weightlab"):
            for key, spec in spectra:
                first.put(key, spec)
    finally:
        library_log.removeHandler(caplog.handler)
        library_log.propagate = propagate
    kept = {p.name.split(".")[0] for _, _, p in first.entries()}
    assert kept == {spectra[0][0], spectra[1][0]}
    assert [r.getMessage() for r in caplog.records if "cache is full" in r.getMessage()] == [
        f"{first.folder}: the decomposition cache is full ({human_bytes(2 * size)}, --cache-size) with this "
        "run's entries: later decompositions are not kept; raise --cache-size to keep them all"
    ]
    for _, _, path in first.entries():
        os.utime(path, (1e9, 1e9))  # written by an earlier run
    second = DecompositionCache(tmp_path / "cache", max_bytes=2 * size)
    hits = 0
    for key, spec in spectra:
        if second.get(key, (40, 40), None) is not None:
            hits += 1
        else:
            second.put(key, spec)
    assert hits == 2 and {p.name.split(".")[0] for _, _, p in second.entries()} == kept


def test_concurrent_runs_share_one_cache_safely(tmp_path):
    """Eight threads put and get the same keys at once: every read is a whole entry or a miss."""
    cache = DecompositionCache(tmp_path)
    items = [(content_key(w), decompose(w)) for w in (decaying(50, 30, seed=s).float() for s in range(3))]
    errors = []

    def worker() -> None:
        for _ in range(10):
            for key, spec in items:
                cache.put(key, spec)
                got = cache.get(key, (50, 30), None)
                if got is not None and not (torch.equal(got.S, spec.S) and torch.equal(got.E, spec.E)):
                    errors.append(key)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert not list(tmp_path.rglob("*.partial"))
    assert len(cache.entries()) == 3


def test_values_only_gives_the_same_values_and_no_vectors(pair):
    root, base, _ = pair
    b, f = open_checkpoint(root / "base.safetensors"), open_checkpoint(root / "ft.safetensors")
    full = {m.name: m for m in spectrum(b, [f]).matrices}
    for m in spectrum(b, [f], SpectrumOptions(values_only=True)).matrices:
        assert m.u_alignment == m.best_match_cos == m.intruders == [] and m.subspace_similarity is None
        np.testing.assert_allclose(m.sv_ft, full[m.name].sv_ft, rtol=1e-12)
        assert m.delta_rank90 == full[m.name].delta_rank90 and m.relative_change == full[m.name].relative_change
        np.testing.assert_allclose(m.amplification, full[m.name].amplification, rtol=1e-12)
    alone = spectrum(b, [], SpectrumOptions(values_only=True))
    assert alone.finetuned == [] and len(alone.matrices) == len(SHAPES)
    for m in alone.matrices:
        exact = np.linalg.svd(base[m.name].double().numpy(), compute_uv=False)
        np.testing.assert_allclose(m.sv_base, exact, rtol=1e-7, atol=1e-7 * exact[0])
        assert m.ft is None and m.finetuned is None


def test_values_only_cli_on_one_checkpoint_and_cache_options(pair, run_cli, tmp_path, monkeypatch):
    root, _, _ = pair
    monkeypatch.setenv("WEIGHTLAB_CACHE", str(tmp_path / "default-cache"))
    out = tmp_path / "out"
    done = run_cli(
        "spectrum",
        str(root / "base.safetensors"),
        "--values-only",
        "--json",
        str(out / "s.json"),
        "--csv",
        str(out / "s.csv"),
        "--plots",
        str(out / "plots"),
        "--report",
        str(out / "r.html"),
    )
    assert done[0] == 0, done
    payload = json.loads((out / "s.json").read_text())
    assert payload["finetuned"] == [] and len(payload["matrices"]) == len(SHAPES)
    assert (out / "plots" / "spectrum_curves.png").exists() and (out / "r.html").exists()
    assert not (tmp_path / "default-cache").exists()  # values alone are not cached
    assert run_cli("report", str(out / "s.json"), "-o", str(tmp_path / "again.html"))[0] == 0

    missing = run_cli("spectrum", str(root / "base.safetensors"))
    assert missing[0] == 2 and "--values-only" in missing[2]

    folder_input = tmp_path / "base_folder"
    folder_input.mkdir()
    (folder_input / "model.safetensors").write_bytes((root / "base.safetensors").read_bytes())
    inside = run_cli(
        "spectrum", str(folder_input), str(root / "ft.safetensors"), "--cache-dir", str(folder_input / "c")
    )
    assert inside[0] == 2 and "--cache-dir" in inside[2] and not (folder_input / "c").exists()

    bad = run_cli("spectrum", str(root / "base.safetensors"), str(root / "ft.safetensors"), "--cache-size", "-1")
    assert bad[0] == 2 and "--cache-size" in bad[2]

    folder = tmp_path / "mycache"
    ignored = run_cli(
        "spectrum",
        str(root / "base.safetensors"),
        str(root / "ft.safetensors"),
        "--no-cache",
        "--cache-dir",
        str(folder),
    )
    assert ignored[0] == 2 and "--cache-dir does not apply" in ignored[2]  # an option that changes nothing is refused
    assert not folder.exists()
    assert (
        run_cli("spectrum", str(root / "base.safetensors"), str(root / "ft.safetensors"), "--cache-dir", str(folder))[0]
        == 0
    )
    # per matrix: the base's top vectors, the fine-tune's top triplets and the update's values
    assert len(DecompositionCache(folder).entries()) == 3 * len(SHAPES)
