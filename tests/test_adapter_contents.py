"""Every tensor of a PEFT adapter is understood or refused: saved modules (`modules_to_save`) and
LoRA biases (`lora_bias`) take part in W', in τ and in every adapter weightlab writes; PEFT
itself is the reference (its merge_and_unload, and its loading of our outputs)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from weightlab import synthetic
from weightlab.analysis.compare import compare
from weightlab.analysis.spectrum import spectrum
from weightlab.io import open_checkpoint, open_finetuned
from weightlab.merging.adapters import merge_as_adapter
from weightlab.merging.config import MergeConfig
from weightlab.merging.run import merge


def _trained_adapter(folder, seed: int, **config):
    """A bert adapter saved by PEFT whose saved pooler and LoRA biases moved (as training moves them)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(
        synthetic.tiny_model("bert", seed=0),
        LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], init_lora_weights=False, **config),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modules_to_save" in name or "lora_B.bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def bank(zoo, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter-contents")
    merged = {}
    for key, seed in (("a", 1), ("b", 2)):
        model = _trained_adapter(root / key, seed, modules_to_save=["pooler.dense"], lora_bias=True)
        merged[key] = {n: t.detach().clone() for n, t in model.merge_and_unload().state_dict().items()}
        (root / f"{key}_dense").mkdir()
        save_file({n: t.contiguous() for n, t in merged[key].items()}, root / f"{key}_dense" / "model.safetensors")
        shutil.copy(zoo["bert"] / "config.json", root / f"{key}_dense" / "config.json")
    return root, merged


def _peft_merged(base_folder, adapter_folder) -> dict[str, torch.Tensor]:
    """What PEFT makes of an adapter folder on the base: merge_and_unload's weights."""
    from peft import PeftModel
    from transformers import AutoModel

    model = PeftModel.from_pretrained(AutoModel.from_pretrained(base_folder), adapter_folder)
    return {n: t.detach() for n, t in model.merge_and_unload().state_dict().items()}


def test_saved_modules_and_lora_biases_are_what_peft_merges(zoo, bank):
    root, merged = bank
    base = open_checkpoint(zoo["bert"])
    ft = open_finetuned(root / "a", base)
    assert set(ft.saved_of) == {"pooler.dense.weight", "pooler.dense.bias"} and len(ft.bias_of) == 4
    for name in base.names():
        torch.testing.assert_close(ft.get(name), merged["a"][name].float(), rtol=0, atol=1e-6, msg=name)


def test_compare_counts_the_whole_update_of_an_adapter(zoo, bank):
    """‖τ‖ of the adapter is the norm of its merged checkpoint's update, saved pooler and biases included."""
    root, _ = bank
    base = open_checkpoint(zoo["bert"])
    as_adapters = compare(base, [open_finetuned(root / "a", base), open_finetuned(root / "b", base)])
    as_dense = compare(base, [open_checkpoint(root / "a_dense"), open_checkpoint(root / "b_dense")])
    for got, want in zip(as_adapters.norms, as_dense.norms):
        assert got == pytest.approx(want, rel=1e-5)
    assert as_adapters.overall.cosine[0][1] == pytest.approx(as_dense.overall.cosine[0][1], abs=1e-5)


def test_spectrum_of_a_saved_matrix_is_the_dense_one(zoo, bank):
    root, _ = bank
    base = open_checkpoint(zoo["bert"])
    adapter = {m.name: m for m in spectrum(base, [open_finetuned(root / "a", base)]).matrices}
    dense = {m.name: m for m in spectrum(base, [open_checkpoint(root / "a_dense")]).matrices}
    assert "pooler.dense.weight" in adapter
    for name, m in adapter.items():
        assert m.relative_change == pytest.approx(dense[name].relative_change, rel=1e-4), name


def test_merge_as_adapter_carries_saved_modules_and_biases(zoo, bank, tmp_path):
    """TA and TIES of two adapters with saved poolers and LoRA biases, written as an adapter that PEFT
    loads: equal to the dense merge of their merged checkpoints."""
    root, _ = bank
    models = [str(root / "a"), str(root / "b")]
    dense_models = [str(root / "a_dense"), str(root / "b_dense")]
    for method, params in (("task-arithmetic", {"lambda": 0.7}), ("ties", {"density": 0.5})):
        out = tmp_path / f"{method}-adapter"
        merge_as_adapter(MergeConfig(method, models, str(zoo["bert"]), params=params), out)
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["modules_to_save"] == ["pooler.dense"] and config["lora_bias"] is True
        merge(MergeConfig(method, dense_models, str(zoo["bert"]), params=params), tmp_path / f"{method}-dense")
        want = load_file(tmp_path / f"{method}-dense" / "model.safetensors")
        got = _peft_merged(zoo["bert"], out)
        for name, tensor in want.items():
            if method == "ties" and name.endswith(("query.weight", "value.weight")):
                continue  # TIES on factors works in the joint low-rank space (KnOTS), not entry by entry
            torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-5, msg=f"{method} {name}")


def test_lambda_auto_as_adapter_is_the_dense_auto_merge_saved_modules_and_biases_included(zoo, bank, tmp_path):
    """λ auto per tensor on LoRA products, LoRA biases and saved tensors alike: the adapter PEFT
    loads equals the dense auto merge of the merged checkpoints, λ for λ, with a weight subtracted."""
    root, _ = bank
    base = str(zoo["bert"])
    params, weights = {"lambda": "auto"}, [1.0, -0.5]
    report, _ = merge_as_adapter(
        MergeConfig("task-arithmetic", [str(root / "a"), str(root / "b")], base, weights=weights, params=dict(params)),
        tmp_path / "adapter",
    )
    dense_models = [str(root / "a_dense"), str(root / "b_dense")]
    dense = merge(
        MergeConfig("task-arithmetic", dense_models, base, weights=weights, params=dict(params)), tmp_path / "dense"
    )
    want, got = load_file(tmp_path / "dense" / "model.safetensors"), _peft_merged(zoo["bert"], tmp_path / "adapter")
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    chosen = report.auto_lambda  # every tensor the adapters change: products, LoRA biases, saved tensors
    assert {
        "pooler.dense.weight",
        "pooler.dense.bias",
        "encoder.layer.0.attention.self.query.weight",
        "encoder.layer.0.attention.self.query.bias",
    } <= set(chosen)
    for name, lam in chosen.items():
        assert lam == pytest.approx(dense.auto_lambda[name], rel=1e-6), name


def test_merge_as_adapter_with_saved_modules_needs_the_base(bank, tmp_path):
    from weightlab.errors import InvalidArgument

    root, _ = bank
    with pytest.raises(InvalidArgument, match="give --base"):
        merge_as_adapter(MergeConfig("average", [str(root / "a"), str(root / "b")]), tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_mitigating_an_adapter_keeps_everything_it_holds(zoo, bank, tmp_path, run_cli):
    """λ = 1 changes nothing: the adapter written back makes, through PEFT, exactly the model the
    input adapter makes (saved pooler, LoRA biases, modules outside --include all kept)."""
    root, merged = bank
    out = tmp_path / "mitigated"
    code, _, err = run_cli(
        "mitigate-intruders",
        zoo["bert"],
        root / "a",
        "-o",
        out,
        "--lambda",
        "1",
        "--include",
        "layer\\.0\\.",
        "--epsilon",
        "0.9",
    )
    assert code == 0, err
    got = _peft_merged(zoo["bert"], out)
    for name, tensor in merged["a"].items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_tensors_no_rule_explains_are_refused_by_name(zoo, adapters, tmp_path):
    from weightlab.errors import CorruptCheckpoint

    cases = {
        "base_model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": (torch.ones(32), "neither a LoRA factor"),
        "base_model.model.layers.0.self_attn.q_proj.lora_B.bias": (torch.ones(32), "lora_bias: true"),
        "base_model.model.layers.0.mlp.up_proj.base_layer.weight": (torch.ones(64, 32), "without LoRA factors"),
        "base_model.model.norm.weight": (torch.ones(32), "modules_to_save"),
    }
    for key, (tensor, message) in cases.items():
        folder = tmp_path / key.replace(".", "-")
        shutil.copytree(adapters["llama"], folder)
        tensors = load_file(folder / "adapter_model.safetensors")
        tensors[key] = tensor
        save_file(tensors, folder / "adapter_model.safetensors")
        with pytest.raises(CorruptCheckpoint, match=message) as caught:
            open_checkpoint(folder)
        assert key in str(caught.value)


def test_a_saved_head_the_base_lacks_is_only_in_the_fine_tune(zoo, adapters, tmp_path):
    """A new classification head (modules_to_save on a model with a head the base has not): the
    analyses note it as a tensor only the fine-tune has, like a dense fine-tune's head."""
    folder = tmp_path / "with-head"
    shutil.copytree(adapters["bert"], folder)
    tensors = load_file(folder / "adapter_model.safetensors")
    tensors["base_model.model.classifier.weight"] = torch.randn(2, 32)
    save_file(tensors, folder / "adapter_model.safetensors")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": ["classifier"]}))
    base = open_checkpoint(zoo["bert"])
    result = spectrum(base, [open_finetuned(folder, base)])
    assert any("classifier.weight" in p and str(zoo["bert"]) in p for p in result.problems), result.problems


@pytest.mark.parametrize("method", ["task-arithmetic", "ties", "iso-c"])
def test_adapters_merge_densely_as_the_checkpoints_peft_merges(zoo, bank, tmp_path, method, monkeypatch):
    """Adapters given as models (no --as-adapter) merge as W + s·B·A on the base — saved pooler and
    LoRA biases included — equal to merging PEFT's merge_and_unload checkpoints; also when the
    tensors go in row blocks (the adapted ones are then taken whole, the others read from the base)."""
    import weightlab.merging.run as run

    root, _ = bank
    base = str(zoo["bert"])
    params = {"density": 0.5} if method == "ties" else {}
    merge(MergeConfig(method, [str(root / "a_dense"), str(root / "b_dense")], base, params=params), tmp_path / "dense")
    want = load_file(tmp_path / "dense" / "model.safetensors")
    for rows in (False, True):
        if rows:
            monkeypatch.setattr(run, "ROW_BLOCK_BYTES", 256)  # every tensor of 512 bytes or more in blocks
        out = tmp_path / f"adapters-{rows}"
        report = merge(MergeConfig(method, [str(root / "a"), str(root / "b")], base, params=params), out)
        got = load_file(out / "model.safetensors")
        assert got.keys() == want.keys() and report.merged > 0
        for name, tensor in want.items():
            torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-6, msg=f"{method} {name}")


def test_an_adapter_to_merge_densely_needs_its_base(bank, tmp_path, run_cli):
    root, _ = bank
    code, _, err = run_cli("merge", "--method", "average", root / "a", root / "b", "-o", tmp_path / "m")
    assert code == 2 and "a LoRA adapter: give --base" in err and "--as-adapter" in err
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("saved", [["pooler"], ["dense"]])
def test_a_saved_parent_module_covers_every_tensor_below_it(saved, zoo, tmp_path):
    """PEFT's rule (`modules_to_save=["pooler"]`, docs/merge.md's own example): a saved module is saved
    whole, its submodules' tensors included; which tensors are saved and W' are what PEFT makes."""
    model = _trained_adapter(tmp_path / "a", 3, modules_to_save=saved)
    wrapped = {  # the tensors PEFT itself wrapped to save, by their names in the base
        n.removeprefix("base_model.model.").replace(".modules_to_save.default", "")
        for n, _ in model.named_parameters()
        if ".modules_to_save.default." in n
    }
    want = {n: t.detach() for n, t in model.merge_and_unload().state_dict().items()}
    base = open_checkpoint(zoo["bert"])
    ft = open_finetuned(tmp_path / "a", base)
    assert len(wrapped) >= 2 and set(ft.saved_of) == wrapped
    for name in base.names():
        torch.testing.assert_close(ft.get(name), want[name].float(), rtol=0, atol=1e-6, msg=name)
