"""`wl.merge(..., into=module)` loads the merged model into the module all or nothing: a refused
call leaves every tensor of the module bit-identical (same values, same storage), and a model whose
tensors are tied, wrapped by PEFT or compiled loads as it would from its saved folder."""

from __future__ import annotations

import copy

import pytest
import torch

import weightlab as wl
from weightlab import synthetic


def _fingerprint(module: torch.nn.Module) -> dict[str, tuple[int, torch.Tensor]]:
    """Every tensor of the module: where its storage is and a copy of its values."""
    return {
        k: (0 if t.is_meta else t.data_ptr(), t.detach().clone()) for k, t in module.state_dict(keep_vars=True).items()
    }


def _unchanged(module: torch.nn.Module, before: dict[str, tuple[int, torch.Tensor]]) -> None:
    after = _fingerprint(module)
    assert after.keys() == before.keys()
    for key, (ptr, values) in before.items():
        same = after[key][1].is_meta if values.is_meta else torch.equal(after[key][1], values)
        assert after[key][0] == ptr and same, key


@pytest.fixture(scope="module")
def pair():
    """Two fine-tunes of a tiny Llama in memory, and their merge."""
    base = synthetic.tiny_model("llama", seed=0)
    a = synthetic.finetune(synthetic.tiny_model("llama", seed=0), steps=3, seed=1)
    b = synthetic.finetune(synthetic.tiny_model("llama", seed=0), steps=3, seed=2)
    merged = wl.merge(base, [a, b], method="task-arithmetic", lam=0.5)
    return base, a, b, merged


def _extra_parameter(module):
    module.extra = torch.nn.Linear(4, 4)
    return module


def _missing_parameter(module):
    del module.norm
    module.norm = torch.nn.Identity()
    return module


def _other_dtype_buffer(module):
    module.register_buffer("step", torch.zeros(3, dtype=torch.int64))
    return module


REFUSALS = {  # how a module differs from the merged model -> the message
    "another-width": (lambda: synthetic.tiny_model("llama", seed=0, hidden=48), "the module's is"),
    "another-depth": (lambda: synthetic.tiny_model("llama", seed=0, layers=3), "tensors the merged model lacks"),
    "another-family": (lambda: synthetic.tiny_model("bert", seed=0), "tensors the module lacks"),
    "an-extra-parameter": (lambda: _extra_parameter(synthetic.tiny_model("llama", seed=0)), "the merged model lacks"),
    "a-missing-parameter": (lambda: _missing_parameter(synthetic.tiny_model("llama", seed=0)), "the module lacks"),
    "on-the-meta-device": (lambda: synthetic.tiny_model("llama", seed=0).to("meta"), "meta device"),
}


@pytest.mark.parametrize("case", REFUSALS, ids=list(REFUSALS))
def test_a_refused_into_leaves_the_module_bit_identical(case, pair):
    base, a, b, _ = pair
    make, message = REFUSALS[case]
    module = make()
    before = _fingerprint(module)
    with pytest.raises(wl.WeightlabError, match=message):
        wl.merge(base, [a, b], method="task-arithmetic", lam=0.5, into=module)
    _unchanged(module, before)


def test_a_buffer_of_another_kind_is_refused_before_any_copy(pair):
    """An integer buffer the merged model holds as floats: refused, the floats already checked untouched."""
    _, _, _, merged = pair
    module = _other_dtype_buffer(synthetic.tiny_model("llama", seed=0))
    state = {**merged, "step": torch.zeros(3)}
    before = _fingerprint(module)
    from weightlab.io.memory import load_into

    with pytest.raises(wl.WeightlabError, match=r"torch\.float32 but the module's is torch\.int64"):
        load_into(module, state)
    _unchanged(module, before)


def test_into_loads_what_the_merge_returns_casting_floats(pair):
    base, a, b, merged = pair
    module = synthetic.tiny_model("llama", seed=5).to(torch.bfloat16)
    assert wl.merge(base, [a, b], method="task-arithmetic", lam=0.5, into=module) is module
    for name, tensor in module.state_dict().items():
        torch.testing.assert_close(tensor, merged[name].to(torch.bfloat16), rtol=0, atol=0, msg=name)


def _tied_llama(seed: int) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    config = synthetic.tiny_config("llama")
    config.tie_word_embeddings = True
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model


def _nudged(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=gen))
    return model


def test_a_tied_model_loads_and_stays_tied():
    """A Llama with tie_word_embeddings was refused as 'Missing key lm_head.weight' after every tensor
    had been overwritten: the tie is one tensor, written once."""
    base = _tied_llama(0)
    a, b = _nudged(copy.deepcopy(base), 1), _nudged(copy.deepcopy(base), 2)
    merged = wl.merge(base, [a, b], method="task-arithmetic", lam=0.5)
    assert "lm_head.weight" not in merged  # saved once, as save_pretrained keeps it
    module = _tied_llama(9)
    wl.merge(base, [a, b], method="task-arithmetic", lam=0.5, into=module)
    assert module.lm_head.weight.data_ptr() == module.model.embed_tokens.weight.data_ptr()
    for name, tensor in merged.items():
        torch.testing.assert_close(module.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    expected = base.lm_head.weight + 0.5 * (
        (a.lm_head.weight - base.lm_head.weight) + (b.lm_head.weight - base.lm_head.weight)
    )
    torch.testing.assert_close(module.lm_head.weight, expected, rtol=1e-6, atol=1e-6)


def test_both_names_of_a_tie_load_when_equal_and_are_refused_when_not(tmp_path):
    """A checkpoint that saved lm_head and embed_tokens both (as some writers do) loads into a tied
    model when they agree; when they differ the tie cannot hold both, and nothing is written."""
    from weightlab.io.memory import load_into

    module = _tied_llama(3)
    state = {k: v.detach().clone() for k, v in _tied_llama(4).state_dict().items()}
    assert "lm_head.weight" in state and "model.embed_tokens.weight" in state
    load_into(module, state)
    torch.testing.assert_close(module.lm_head.weight, state["lm_head.weight"], rtol=0, atol=0)
    state["lm_head.weight"] = state["lm_head.weight"] + 1
    before = _fingerprint(module)
    with pytest.raises(wl.WeightlabError, match="ties it to"):
        load_into(module, state)
    _unchanged(module, before)


def test_a_peft_model_and_a_compiled_model_load_their_base_weights(pair):
    """Into a PeftModel: the merged weights go to the wrapped base layers, the LoRA factors stay; a
    compiled module (`_orig_mod.`) loads under its saved names."""
    from peft import LoraConfig, get_peft_model

    base, a, b, merged = pair
    peft_model = get_peft_model(
        synthetic.tiny_model("llama", seed=5), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    )
    factors = {k: v.clone() for k, v in peft_model.state_dict().items() if "lora_" in k}
    wl.merge(base, [a, b], method="task-arithmetic", lam=0.5, into=peft_model)
    state = peft_model.state_dict()
    for key, value in factors.items():
        assert torch.equal(state[key], value), key
    q = "base_model.model.layers.0.self_attn.q_proj.base_layer.weight"
    torch.testing.assert_close(state[q], merged["layers.0.self_attn.q_proj.weight"], rtol=0, atol=0)
    compiled = torch.compile(synthetic.tiny_model("llama", seed=6), backend="eager")
    wl.merge(base, [a, b], method="task-arithmetic", lam=0.5, into=compiled)
    for name, tensor in merged.items():
        torch.testing.assert_close(compiled.state_dict()[f"_orig_mod.{name}"], tensor, rtol=0, atol=0, msg=name)
