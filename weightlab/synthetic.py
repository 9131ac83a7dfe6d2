"""Seeded tiny models, real brief fine-tunes and planted changes: ground truths for tests,
examples and benchmarks. Nothing here downloads anything."""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("llama", "bert", "gpt2")


def tiny_config(family: str, layers: int = 2, hidden: int = 32):
    """A small transformers config of one family (Llama, BERT or GPT-2)."""
    from transformers import BertConfig, GPT2Config, LlamaConfig

    if family == "llama":
        return LlamaConfig(
            vocab_size=128,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        )
    if family == "bert":
        return BertConfig(
            vocab_size=128,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            max_position_embeddings=64,
        )
    if family == "gpt2":
        return GPT2Config(vocab_size=128, n_embd=hidden, n_layer=layers, n_head=4, n_positions=64)
    raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")


def tiny_model(family: str, seed: int = 0, layers: int = 2, hidden: int = 32, causal_lm: bool = False):
    """A randomly initialised tiny model, identical for the same seed."""
    from transformers import AutoModel, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(family, layers, hidden)
    auto = AutoModelForCausalLM if causal_lm and family != "bert" else AutoModel
    return auto.from_config(config).eval()


def finetune(model, steps: int = 10, seed: int = 1, lr: float = 1e-2, seq_len: int = 16, batch: int = 8):
    """A few real Adam steps on a synthetic task: map random token sequences to a fixed random
    projection of their one-hot sums (a regression on the last hidden state)."""
    gen = torch.Generator().manual_seed(seed)
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    target_map = torch.randn(vocab, hidden, generator=gen)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        ids = torch.randint(0, vocab, (batch, seq_len), generator=gen)
        out = model(input_ids=ids, output_hidden_states=True)
        hidden_states = out.hidden_states[-1]
        loss = torch.nn.functional.mse_loss(hidden_states, target_map[ids])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()


def tiny_tokenizer(folder: str | Path, vocab: int = 128) -> Path:
    """A word-level tokenizer for tiny models: words w0, w1, … (ids 4 on), [PAD]=0, [UNK]=1,
    [CLS]=2, [SEP]=3; saved as transformers saves a fast tokenizer (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, **{f"w{i}": 4 + i for i in range(vocab - 4)}}
    core = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )
    fast.save_pretrained(folder)
    return Path(folder)


def tiny_texts(count: int, seed: int = 0, vocab: int = 128, words: tuple[int, int] = (3, 12)) -> list[str]:
    """Seeded texts of the tiny tokenizer's words, of varied lengths (so batches are padded)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        n = int(torch.randint(words[0], words[1] + 1, (1,), generator=gen))
        out.append(" ".join(f"w{int(i)}" for i in torch.randint(0, vocab - 4, (n,), generator=gen)))
    return out


def save(model, folder: str | Path, max_shard_size: str | None = None) -> Path:
    """`save_pretrained` with safetensors, optionally sharded."""
    folder = Path(folder)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    return folder


def rank_one_along(weight: torch.Tensor, i: int, amount: float) -> torch.Tensor:
    """ΔW = amount·u_i v_iᵀ along the i-th singular pair (0-based) of `weight`: a planted change
    that raises σ_i by `amount` and leaves every singular vector and other σ where it was."""
    u, _, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    return (amount * torch.outer(u[:, i], vh[i])).to(weight.dtype)


def random_lora_like(out_dim: int, in_dim: int, rank: int, norm: float, seed: int = 0) -> torch.Tensor:
    """A random rank-`rank` update of Frobenius norm `norm` (what LoRA training produces)."""
    gen = torch.Generator().manual_seed(seed)
    b = torch.randn(out_dim, rank, generator=gen, dtype=torch.float64)
    a = torch.randn(rank, in_dim, generator=gen, dtype=torch.float64)
    delta = b @ a
    return delta * (norm / delta.norm())
