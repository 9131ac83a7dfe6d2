"""Small real checkpoints for the examples: a seeded tiny Llama and brief real fine-tunes of it
(a few Adam steps each), written with transformers into a work folder. Swap in your own paths."""

from __future__ import annotations

from pathlib import Path

from weightlab import synthetic


def workspace(folder: str | Path = "example-models") -> dict[str, Path]:
    root = Path(folder)
    paths = {"base": root / "base", **{f"ft_{k}": root / f"ft_{k}" for k in ("a", "b", "c")}, "warmup": root / "warmup"}
    if all(p.exists() for p in paths.values()):
        return paths
    synthetic.save(synthetic.tiny_model("llama", seed=0, layers=4, hidden=64), paths["base"])
    for seed, key in enumerate(("ft_a", "ft_b", "ft_c"), start=1):
        model = synthetic.finetune(synthetic.tiny_model("llama", seed=0, layers=4, hidden=64), steps=8, seed=seed)
        synthetic.save(model, paths[key])
    from peft import LoraConfig, get_peft_model

    # a short LoRA warm-up run: LoRA-Init reads its task-specific directions
    model = get_peft_model(
        synthetic.tiny_model("llama", seed=0, layers=4, hidden=64),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    synthetic.finetune(model, steps=8, seed=7)
    model.save_pretrained(paths["warmup"])
    return paths


def to_gguf(folder: str | Path, out: str | Path, kind: str) -> Path:
    """A Hugging Face Llama folder as a GGUF file whose matrices llama.cpp's own `gguf` package
    quantizes to `kind` (Q8_0, Q4_0, Q5_1, …), named and laid out as llama.cpp's converter writes
    them (Q and K rows in its rotary order). For a real model use llama.cpp's converter
    (convert_hf_to_gguf.py) and llama-quantize; this is the same format, made small."""
    import json

    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    from weightlab.io.gguf_names import GLOBALS, LLAMA_BLOCK

    config = json.loads((Path(folder) / "config.json").read_text())
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    gguf_name = {f"{hf.removeprefix('model.')}.weight": f"{g}.weight" for g, hf in GLOBALS.items()}
    gguf_name.update(
        {
            f"layers.{i}.{hf}.weight": f"blk.{i}.{g}.weight"
            for i in range(config["num_hidden_layers"])
            for g, hf in LLAMA_BLOCK.items()
        }
    )
    qtype = gguf.GGMLQuantizationType[kind]
    for name, w in sorted(load_file(str(Path(folder) / "model.safetensors")).items()):
        w = w.astype(np.float32)
        if name.endswith(("q_proj.weight", "k_proj.weight")):  # llama.cpp's `permute`
            n = heads if "q_proj" in name else kv
            w = w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
        if w.ndim == 2 and w.shape[1] % 32 == 0:
            writer.add_tensor(gguf_name[name.removeprefix("model.")], gguf.quants.quantize(w, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name[name.removeprefix("model.")], w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(out)
