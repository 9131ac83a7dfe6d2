"""Initialise a LoRA from a warm-up run's task-specific directions (LoRA-Init), for PEFT."""

import subprocess
import sys

from _models import workspace


def weightlab(*args) -> None:
    subprocess.run([sys.executable, "-m", "weightlab", *map(str, args), "--force"], check=True)


m = workspace()
weightlab("tsd", m["base"], m["warmup"], "--top", "4", "--save", "out/tsd.safetensors")
weightlab(
    "init-lora",
    m["base"],
    "--tsd",
    "--from",
    m["warmup"],
    "--rank",
    "4",
    "--targets",
    "q_proj,v_proj",
    "-o",
    "out/lora-init",
    "--residual-out",
    "out/base-residual",
)
print("load with: PeftModel.from_pretrained(AutoModel.from_pretrained('out/base-residual'), 'out/lora-init')")
