"""`weightlab quant-error`: what quantization did to each weight matrix."""

from __future__ import annotations

from pathlib import Path

import typer

from weightlab.cli.app import Common, analysis_command
from weightlab.options import CacheOptions, QuantErrorOptions


@analysis_command("quant-error")
def quant_error(
    reference: Path = typer.Argument(..., help="The full-precision model (file, folder or Hub ID)."),
    quantized: list[Path] = typer.Argument(
        ..., help="Quantized versions of it: GGUF files, GPTQ/AWQ/bitsandbytes/FP8/MLX folders, any checkpoint."
    ),
    lora: Path | None = typer.Option(
        None, "--lora", help="A LoRA adapter added to each quantized model first: what it leaves of the error (LoftQ)."
    ),
    options: QuantErrorOptions = None,
    cache: CacheOptions = None,
    common: Common = None,
) -> None:
    """Quantization error per matrix: ‖E‖/‖W‖, SNR, bits/weight, noise-like or structured, top directions, Δα.

    Example: weightlab quant-error llama-2-7b/ llama-2-7b.Q4_K_M.gguf --report quant.html

    E = Q − W for every matrix; the reference's decompositions are cached by content, so several
    quantizations of one model share them.
    """
    from weightlab.api.analyses import quant_error as run_quant_error

    common.show(run_quant_error.core(reference, quantized, lora, options=options, cache=cache, run=common.run()))
