"""`weightlab build-moe`: a Mixture-of-Experts model from dense fine-tunes, from a mergekit-moe recipe."""

from __future__ import annotations

from pathlib import Path

import typer

from weightlab.cli.app import Operation, operation_command


@operation_command("build-moe", local=True)
def build_moe(
    recipe: Path = typer.Argument(..., help="A mergekit-moe YAML recipe (base_model, experts, gate_mode, …)."),
    seed: int = typer.Option(0, "--seed", help="Seed of random router rows and of noise_scale."),
    tokenizer: Path | None = typer.Option(
        None, "--tokenizer", help="Tokenizer folder for the prompts (default: the base's)."
    ),
    common: Operation = None,
) -> None:
    """Build an MoE from dense fine-tunes as mergekit-moe does: MLPs become experts, prompts make the router.

    Example: weightlab build-moe moe.yml -o my-moe/

    Outputs Mixtral (Llama/Mistral inputs), Qwen2-MoE (one shared expert) or Qwen3-MoE (Qwen3
    inputs), written tensor by tensor; transformers loads them as they are.
    """
    from weightlab.api.operations import build_moe as run_build

    common.show(run_build.core(recipe, out=common.out, seed=seed, tokenizer=tokenizer, run=common.run()))
