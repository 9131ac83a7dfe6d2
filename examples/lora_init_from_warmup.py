"""Initialise a LoRA from a warm-up run's task-specific directions (LoRA-Init), for PEFT."""

import subprocess

from _models import workspace

m = workspace()
subprocess.run(["weightlab", "tsd", m["base"], m["warmup"], "--top", "4", "--save", "out/tsd.safetensors", "--force"],
               check=True)
subprocess.run(["weightlab", "init-lora", m["base"], "--tsd", "--from", m["warmup"], "--rank", "4",
                "--targets", "q_proj,v_proj", "-o", "out/lora-init", "--residual-out", "out/base-residual", "--force"],
               check=True)
print("load with: PeftModel.from_pretrained(AutoModel.from_pretrained('out/base-residual'), 'out/lora-init')")
