"""RegMean, RegMean++ and Fisher merging on real (tiny) transformers models run on calibration
text, against plain references written here: one text at a time, our own hooks, numpy solves."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, BertModel, GPT2LMHeadModel

from weightlab.api import merge
from weightlab.errors import WeightlabError
from weightlab.io import open_weights
from weightlab.naming import layer_index
from weightlab.synthetic import finetune, save, tiny_model, tiny_texts, tiny_tokenizer


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    """A tiny BERT base with its tokenizer, two brief fine-tunes, a calibration file per model."""
    root = tmp_path_factory.mktemp("data-aware")
    base = save(tiny_model("bert", seed=0), root / "base")
    tiny_tokenizer(base)
    models, texts = [], []
    for i in (1, 2):
        models.append(save(finetune(tiny_model("bert", seed=0), steps=8, seed=i, lr=3e-2), root / f"ft{i}"))
        texts.append(root / f"calib{i}.txt")
        texts[-1].write_text("\n".join(tiny_texts(20, seed=10 + i)) + "\n")
    return root, base, models, texts


def linear_inputs(model, tokenizer, texts, names):
    """Plain reference: Σ_text XᵀX of each named linear layer's input, one text at a time (no padding)."""
    grams = {}
    modules = dict(model.named_modules())

    def hook(name):
        def record(module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            grams[name] = grams.get(name, 0) + x.T @ x

        return record

    handles = [modules[n.removesuffix(".weight")].register_forward_hook(hook(n)) for n in names]
    with torch.no_grad():
        for text in texts:
            model(**tokenizer(text, return_tensors="pt"))
    for h in handles:
        h.remove()
    return grams


def state(folder):
    ckpt = open_weights(folder)
    return {n: ckpt.get(n) for n in ckpt.names()}


def ref_regmean(weights, grams, alpha):
    shrunk = [alpha * g.numpy() + (1 - alpha) * np.diag(np.diag(g.numpy())) for g in grams]
    return sum(w.double().numpy() @ g for w, g in zip(weights, shrunk)) @ np.linalg.inv(sum(shrunk))


def linear_names(model):
    return [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def test_regmean_equals_the_plain_reference(bank, tmp_path):
    _root, base, models, texts = bank
    merge(base, models, method="regmean", calibration=texts, alpha=0.7, out=tmp_path / "m")
    got = state(tmp_path / "m")
    tokenizer = AutoTokenizer.from_pretrained(base)
    runs = [BertModel.from_pretrained(m).eval() for m in models]
    names = linear_names(runs[0])
    grams = [
        linear_inputs(run, tokenizer, [line for line in t.read_text().splitlines()], names)
        for run, t in zip(runs, texts)
    ]
    fts = [state(m) for m in models]
    for name in names:
        want = ref_regmean([ft[name] for ft in fts], [g[name] for g in grams], 0.7)
        np.testing.assert_allclose(got[name].double().numpy(), want, rtol=1e-4, atol=1e-6, err_msg=name)
    for name in got:  # everything else: the mean of the models
        if name not in names:
            torch.testing.assert_close(got[name], (fts[0][name] + fts[1][name]) / 2)
    record = (tmp_path / "m" / "weightlab_merge.yml").read_text()
    assert "calibration_sha256" in record and "tokenizer" in record


def test_regmean_of_one_models_own_inputs_gives_back_that_model(bank, tmp_path):
    """With the same calibration for two copies of one model, every layer is that model's (α = 1)."""
    _root, base, models, texts = bank
    merge(
        None,
        [models[0], models[0]],
        method="regmean",
        calibration=texts[0],
        alpha=1.0,
        tokenizer=base,
        out=tmp_path / "m",
    )
    got, want = state(tmp_path / "m"), state(models[0])
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5)


def test_regmean_plus_plus_equals_the_layer_by_layer_reference(bank, tmp_path):
    _root, base, models, texts = bank
    merge(base, models, method="regmean++", calibration=texts, out=tmp_path / "m")
    got = state(tmp_path / "m")
    tokenizer = AutoTokenizer.from_pretrained(base)
    fts = [state(m) for m in models]
    run = BertModel.from_pretrained(models[0]).eval()
    names = linear_names(run)
    merged = {n: (fts[0][n] + fts[1][n]) / 2 for n in fts[0]}
    layers = sorted({layer_index(n) for n in names}, key=lambda i: (i is None, i or 0))
    for layer in layers:
        group = [n for n in names if layer_index(n) == layer]
        grams = []
        for ft, t in zip(fts, texts):

            def early(n, layer=layer):
                i = layer_index(n)
                return (
                    (i is not None and layer is not None and i < layer)
                    or (layer is None and i is not None)
                    or (i is None and "embeddings" in n)
                )

            run.load_state_dict({n: merged[n] if early(n) else ft[n] for n in ft})
            grams.append(linear_inputs(run, tokenizer, t.read_text().splitlines(), group))
        for n in group:
            merged[n] = torch.from_numpy(ref_regmean([ft[n] for ft in fts], [g[n] for g in grams], 0.9)).float()
    for name in names:
        torch.testing.assert_close(got[name], merged[name], rtol=1e-4, atol=1e-5, msg=name)
    plain = tmp_path / "plain"
    merge(base, models, method="regmean", calibration=texts, out=plain)
    deep = [n for n in names if layer_index(n) == 1]
    assert any(not torch.allclose(got[n], state(plain)[n]) for n in deep)  # later layers see the merged inputs


def test_fisher_equals_the_plain_reference_with_every_kind_of_coefficient(bank, tmp_path):
    """Unweighted, with --weights and with NAN's per-tensor coefficients: Σ c_iF_iθ_i / Σ c_iF_i,
    F_i from per-text gradients of the Gaussian output model, noise drawn as the method draws it."""
    _root, base, models, texts = bank
    tokenizer = AutoTokenizer.from_pretrained(base)
    fishers, fts = [], [state(m) for m in models]
    for m, t in zip(models, texts):
        run = BertModel.from_pretrained(m).eval()
        generator = torch.Generator().manual_seed(3)
        lines = t.read_text().splitlines()
        total = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in run.named_parameters()}
        for line in lines:
            run.zero_grad()
            hidden = run(**tokenizer(line, return_tensors="pt"))[0]
            (hidden * torch.randn(hidden.shape, generator=generator)).sum().backward()
            for n, p in run.named_parameters():
                if p.grad is not None:  # the pooler does not feed the last hidden states
                    total[n] += p.grad.double() ** 2
        fishers.append({n: f / len(lines) for n, f in total.items()})

    def want(name, c):
        f = [c[i] * fishers[i][name] for i in range(2)]
        floor = 1e-6 * float((f[0] + f[1]).mean())
        if not floor:  # no text moves it: the mean
            return (fts[0][name] + fts[1][name]).double() / 2
        g = [f[i] + floor * c[i] for i in range(2)]
        return (g[0] * fts[0][name] + g[1] * fts[1][name]) / (g[0] + g[1])

    for label, extra in (("plain", {}), ("weights", {"weights": [0.25, 0.75]}), ("nan", {"coeff": "nan"})):
        out = tmp_path / label
        merge(base, models, method="fisher", calibration=texts, seed=3, out=out, json=out.with_suffix(".json"), **extra)
        got = state(out)
        record = json.loads(out.with_suffix(".json").read_text())
        for name in fishers[0]:
            c = (record["coefficients_per_tensor"] or {}).get(name) or extra.get("weights", [1.0, 1.0])
            torch.testing.assert_close(got[name].double(), want(name, c), rtol=1e-4, atol=1e-6, msg=f"{label} {name}")
    assert record["coefficients_per_tensor"]  # NAN set them per tensor


def test_fisher_runs_a_language_model_on_its_own_predictions(tmp_path):
    base = tiny_model("gpt2", seed=0, causal_lm=True)
    tiny_tokenizer(save(base, tmp_path / "base"))
    models = [
        save(finetune(tiny_model("gpt2", seed=0, causal_lm=True), steps=4, seed=i), tmp_path / f"ft{i}") for i in (1, 2)
    ]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in tiny_texts(6)) + "\n")
    for method in ("fisher", "regmean"):
        merged = merge(tmp_path / "base", models, method=method, calibration=tmp_path / "c.jsonl")
        model = GPT2LMHeadModel.from_pretrained(tmp_path / "base")
        model.load_state_dict(merged, strict=False)
        assert all(torch.isfinite(t).all() for t in merged.values())
        # GPT-2's Conv1D holds its weight as in × out: RegMean solves in that orientation
        w = merged["transformer.h.0.attn.c_attn.weight"]
        assert w.shape == state(models[0])["transformer.h.0.attn.c_attn.weight"].shape


def test_calibration_is_refused_by_name(bank, tmp_path):
    _root, base, models, texts = bank
    bad = {
        "empty.txt": b"\n\n  \n",
        "binary.txt": b"w1 w2\x00\x01",
        "latin1.txt": "caf\xe9\n".encode("latin-1"),
        "notext.jsonl": b'{"content": "w1"}\n',
        "broken.jsonl": b"{w1\n",
    }
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(WeightlabError, match=name.replace(".", r"\.")):
            merge(base, models, method="regmean", calibration=tmp_path / name, out=tmp_path / f"out-{name}")
        assert not (tmp_path / f"out-{name}").exists()
    with pytest.raises(WeightlabError, match="give --calibration"):
        merge(base, models, method="regmean")
    with pytest.raises(WeightlabError, match="uses no data"):
        merge(base, models, method="ties", calibration=texts[0])
    with pytest.raises(WeightlabError, match="2 times for 3 models"):
        merge(base, [*models, models[0]], method="fisher", calibration=texts)
    bare = []
    for i, m in enumerate(models):
        (tmp_path / f"bare{i}").mkdir()
        bare.append(tmp_path / f"bare{i}" / "model.safetensors")
        bare[-1].write_bytes((m / "model.safetensors").read_bytes())
    with pytest.raises(WeightlabError, match=r"no config\.json"):
        merge(None, bare, method="regmean", calibration=texts, tokenizer=base)
    with pytest.raises(WeightlabError, match="no tokenizer among the inputs"):
        merge(None, models, method="regmean", calibration=texts)


def test_the_record_makes_the_same_bytes_and_refuses_a_changed_calibration(bank, tmp_path):
    _root, base, models, texts = bank
    calib = tmp_path / "c.txt"
    calib.write_text(texts[0].read_text())
    merge(base, models, method="regmean", calibration=calib, out=tmp_path / "a")
    merge(config=tmp_path / "a" / "weightlab_merge.yml", out=tmp_path / "b")
    for f in ("model.safetensors", "weightlab_merge.yml"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    calib.write_text("w1 w2\n")
    with pytest.raises(WeightlabError, match="changed since the merge record"):
        merge(config=tmp_path / "a" / "weightlab_merge.yml", out=tmp_path / "c")


@pytest.mark.parametrize("method", ["regmean", "fisher"])
def test_adapters_merge_with_data_as_the_checkpoints_peft_merges(bank, tmp_path, method):
    """LoRA adapters given as models run as W + s·B·A on the base (its config.json builds the
    model): the same merge as of PEFT's merge_and_unload checkpoints."""
    import shutil

    from peft import LoraConfig, get_peft_model

    _, base, _, texts = bank
    adapters, dense = [], []
    for i in (1, 2):
        torch.manual_seed(i)
        model = get_peft_model(
            BertModel.from_pretrained(base),
            LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], init_lora_weights=False),
        )
        model.save_pretrained(tmp_path / f"adapter{i}")
        adapters.append(tmp_path / f"adapter{i}")
        dense.append(save(model.merge_and_unload(), tmp_path / f"dense{i}"))
        shutil.copy(base / "config.json", dense[-1] / "config.json")
    want = merge(base, dense, method=method, calibration=texts)
    got = merge(base, adapters, method=method, calibration=texts)
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("method", ["regmean", "regmean++", "fisher"])
def test_models_in_memory_build_from_their_own_config_never_from_the_working_folder(
    method, bank, tmp_path, monkeypatch
):
    """Modules in memory have no folder: a data-aware merge builds them from `module.config`. The
    working folder holds another model's config.json and tokenizer files as decoys: the merge equals
    the one on the saved folders, and without tokenizer= it is refused instead of using the decoy's."""
    _root, base, models, texts = bank
    decoy = tmp_path / "cwd"
    save(tiny_model("bert", seed=3, hidden=48), decoy)  # another model's config.json, other shapes
    tiny_tokenizer(decoy)
    monkeypatch.chdir(decoy)
    merge(base, models, method=method, calibration=texts, out=tmp_path / "on-disk")
    want = state(tmp_path / "on-disk")
    loaded = [BertModel.from_pretrained(m).eval() for m in models]
    got = merge(None, loaded, method=method, calibration=texts, tokenizer=base)
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    with pytest.raises(WeightlabError, match="a model in memory carries none"):
        merge(None, loaded, method=method, calibration=texts)


def test_a_state_dict_in_memory_has_no_config_to_run(bank, tmp_path, monkeypatch):
    _root, base, models, texts = bank
    monkeypatch.chdir(base)  # a config.json right here: still not the state dict's
    tensors = [state(m) for m in models]
    with pytest.raises(WeightlabError, match=r"no \.config"):
        merge(None, tensors, method="regmean", calibration=texts, tokenizer=base)


def _with_config(source, dest, **changes):
    import shutil

    shutil.copytree(source, dest)
    config = json.loads((dest / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**config, **changes}))
    return dest


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"vocab_size": 2**40}, "shape"),  # allocated, it asks for 140 TB
        ({"hidden_size": 4096, "num_attention_heads": 4}, "shape"),  # tens of GB as float32
        ({"intermediate_size": 65}, "shape"),
        ({"num_hidden_layers": 3}, "which the weights"),  # a layer the weights lack
        ({"max_position_embeddings": 2**40}, "shape"),
        ({"hidden_size": "wide"}, "cannot"),
        ({"hidden_size": 30, "num_attention_heads": 4}, "cannot build"),  # 30 is not a multiple of 4
        ({"model_type": "no-such-architecture"}, "not an architecture transformers knows"),
        ({"model_type": ["bert"]}, "not an architecture transformers knows"),
    ],
)
def test_a_config_that_is_not_the_weights_model_is_refused_before_allocating(changes, message, bank, tmp_path):
    """The network is built on the meta device and checked against the weights' headers first: a
    config of other sizes ends in one line naming its config.json, never an allocation."""
    _root, base, models, texts = bank
    lying = _with_config(models[0], tmp_path / "lying", **changes)
    with pytest.raises(WeightlabError, match=message) as caught:
        merge(base, [lying, models[1]], method="regmean", calibration=texts, out=tmp_path / "m")
    assert "config.json" in str(caught.value) or "lying" in str(caught.value)
    assert not (tmp_path / "m").exists()


def test_buffers_beyond_the_weights_size_are_refused_before_allocating():
    """Buffers the checkpoint does not hold (rotary tables, position ids) may take no more than the weights."""
    from weightlab.compute.activations import refuse_oversized
    from weightlab.io.memory import MemoryCheckpoint

    with torch.device("meta"):
        skeleton = torch.nn.Linear(256, 256)
        skeleton.register_buffer("table", torch.empty(2**40), persistent=False)  # 4 TiB as float32
    ckpt = MemoryCheckpoint("m", {"weight": torch.zeros(256, 256), "bias": torch.zeros(256)})
    names = {"weight": "weight", "bias": "bias"}
    with pytest.raises(WeightlabError, match="4194304 MiB of buffers beyond its weights"):
        refuse_oversized(skeleton, names, ckpt, "its config")
    with torch.device("meta"):
        skeleton.register_buffer("table", torch.empty(2**18), persistent=False)  # 1 MiB: within the bound
    refuse_oversized(skeleton, names, ckpt, "its config")


def _long_texts(words: list[str]) -> list[str]:
    gen = torch.Generator().manual_seed(4)
    pick = lambda n: " ".join(words[int(i)] for i in torch.randint(0, len(words), (n,), generator=gen))
    return [
        pick(5),
        pick(300),
        pick(20_000),
        "a" + " " * 100_000 + "b c",  # whitespace the tokenizer drops
        "x" * 5000 + " " + pick(400),  # one word longer than any token
        "漢字" * 5000,  # no spaces at all
        pick(50) + "\n" * 3 + pick(400),
    ]


@pytest.mark.parametrize("tokenizer", ["minilm", "tiny"])
def test_a_text_is_cut_to_what_the_tokenizer_keeps_before_it_is_tokenized(tokenizer, tmp_path):
    """The prefix tokenized gives exactly the tokens the whole text gives, truncated to MAX_TOKENS."""
    from weightlab.compute.activations import MAX_TOKENS, kept_prefix
    from weightlab.examples import minilm_path

    folder = minilm_path() if tokenizer == "minilm" else tiny_tokenizer(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(folder)
    words = tiny_texts(1, words=(2000, 2000))[0].split() if tokenizer == "tiny" else Path(__file__).read_text().split()
    for text in _long_texts(words):
        kept = kept_prefix(tok, text)
        assert len(kept) <= max(len(text) if len(text) < 4 * 16 * MAX_TOKENS else 0, 64 * 16 * MAX_TOKENS)
        whole = tok(text, truncation=True, max_length=MAX_TOKENS)["input_ids"]
        assert tok(kept, truncation=True, max_length=MAX_TOKENS)["input_ids"] == whole, text[:40]


def test_calibration_memory_is_bounded_whatever_a_line_holds(tmp_path):
    """An 8 MB line keeps MAX_TEXT_CHARS characters; reading holds a chunk and the kept texts, not the file."""
    import hashlib
    import tracemalloc

    from weightlab.io.calibration import MAX_TEXT_CHARS, read_calibration

    path = tmp_path / "long.txt"
    line = " ".join(f"w{i % 100}" for i in range(2_000_000))  # about 8 MB
    path.write_text(f"first text\r\n{line}\nthird\u2028fourth\n")
    tracemalloc.start()
    found = read_calibration(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 << 20  # a 1 MiB chunk and its decoded text, not the 8 MB line
    assert found.texts == ("first text", line[:MAX_TEXT_CHARS].strip(), "third", "fourth")  # str.splitlines' lines
    assert found.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_calibration_refuses_what_cannot_be_cut(tmp_path):
    from weightlab.io.calibration import MAX_JSONL_LINE, MAX_TEXTS, read_calibration

    long_json = tmp_path / "long.jsonl"
    long_json.write_text(json.dumps({"text": "w1 " * (MAX_JSONL_LINE // 3 + 1)}) + "\n")
    with pytest.raises(WeightlabError, match="line 1 holds more than 4 Mi characters"):
        read_calibration(long_json)
    many = tmp_path / "many.txt"
    many.write_text("w1\n" * (MAX_TEXTS + 1))
    with pytest.raises(WeightlabError, match="give a sample"):
        read_calibration(many)


def test_a_huge_line_merges_as_its_kept_prefix(bank, tmp_path):
    """RegMean on a file with an 8 MB line equals RegMean on the same file with that line cut to
    its first thousand words: the model runs on the same 128 tokens."""
    _root, base, models, _texts = bank
    words = tiny_texts(1, seed=5, words=(1_000_000, 1_000_000))[0]
    short = " ".join(words.split()[:1000])
    (tmp_path / "huge.txt").write_text("\n".join([*tiny_texts(5, seed=6), words]) + "\n")
    (tmp_path / "short.txt").write_text("\n".join([*tiny_texts(5, seed=6), short]) + "\n")
    merge(base, models, method="regmean", calibration=tmp_path / "huge.txt", out=tmp_path / "a")
    merge(base, models, method="regmean", calibration=tmp_path / "short.txt", out=tmp_path / "b")
    a, b = state(tmp_path / "a"), state(tmp_path / "b")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
