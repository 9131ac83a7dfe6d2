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
