"""A Mixture-of-Experts model end to end: a tiny Qwen3-MoE "upcycled" from one dense MLP (its
experts start as copies, then drift apart a little, as after brief training), `weightlab experts`
to see which experts are near copies, `slim-experts` to fold them, and transformers loading the
slimmed model. Replace moe/ with your own MoE (Mixtral, Qwen2/3-MoE, DeepSeek, gpt-oss)."""

import json
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

config = Qwen3MoeConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8, num_experts_per_tok=2,
)  # fmt: skip
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(config).eval()
with torch.no_grad():  # upcycled: experts in pairs that are near copies of each other
    for layer in model.model.layers:
        experts = layer.mlp.experts
        for e in range(0, 8, 2):
            for p in (experts.gate_up_proj, experts.down_proj):
                p[e + 1] = p[e] + 0.002 * torch.randn_like(p[e])
model.save_pretrained("out/moe")


def weightlab(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "weightlab", *args, "--force"], check=True)


weightlab("experts", "out/moe", "--json", "out/experts.json", "--report", "out/experts.html")
blocks = json.loads(open("out/experts.json").read())["blocks"]
print("near copies per block:", {b["block"]: b["near_copies"] for b in blocks})

weightlab("slim-experts", "out/moe", "--experts", "4", "-o", "out/moe-4")
slim = AutoModelForCausalLM.from_pretrained("out/moe-4").eval()
ids = torch.arange(2, 14)[None]
with torch.no_grad():
    gap = (slim(input_ids=ids).logits - model(input_ids=ids).logits).abs().max()
print(f"slimmed to 4 experts per block: max |Δlogit| {gap:.4f} against the 8-expert model; open out/experts.html")
