"""What slimming an MoE costs in task loss (issue 38): a tiny Qwen3-MoE trained briefly on three
token tasks, slimmed to 75% and 50% of its experts four ways, each scored on held-out sequences.

    python benchmarks/slim_quality.py        # a few minutes on 2 cores

The model (transformers' Qwen3MoeConfig: 4 layers, hidden 64, 8 experts of 64, top-2, seeded) is
trained from scratch on next-token prediction over three tasks whose sequences start with a task
word: copy (the first half repeated), count (each token one past the last) and mirror (the
first half reversed). Slimmed to K experts per block by:
- merge (weights): `slim-experts --by merge` (clusters of alike experts, their mean);
- prune (weights): `slim-experts --by prune` (the weaker of alike experts goes);
- prune (REAP): `slim-experts --by prune --calibration` on 24 training sequences per task;
- merge (routed share): `slim-experts --by merge --calibration`;
- random: K experts kept at random per block (mean over 3 seeds).
Each row gives the held-out loss per task (nats per predicted token, the second half of each
sequence) and its mean; the full model and a bigram-free uniform guess (log V) frame them.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import weightlab as wl

VOCAB, WORDS = 64, 50  # tokens: specials, three task words, then WORDS content words w0…
LENGTH = 8  # content tokens in each half
TASKS = ("copy", "count", "mirror")


def sequence(task: str, rng: random.Random) -> list[str]:
    first = [rng.randrange(WORDS) for _ in range(LENGTH)]
    if task == "copy":
        second = first
    elif task == "count":
        second = [(first[-1] + 1 + k) % WORDS for k in range(LENGTH)]
    else:
        second = first[::-1]
    return [f"task{TASKS.index(task)}", *(f"w{t}" for t in first + second)]


def texts(task: str, n: int, seed: int) -> list[str]:
    rng = random.Random(seed * 7 + TASKS.index(task))
    return [" ".join(sequence(task, rng)) for _ in range(n)]


def tokenizer(folder: Path):
    """The tiny word-level tokenizer with the task words among its words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "<s>", "</s>", *(f"task{i}" for i in range(3)), *(f"w{i}" for i in range(WORDS))]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(folder)
    return fast


def model():
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    config = Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
        max_position_embeddings=64, tie_word_embeddings=False, router_aux_loss_coef=0.01, output_router_logits=True,
    )  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def encode(tok, lines: list[str]) -> torch.Tensor:
    return tok(lines, return_tensors="pt", add_special_tokens=False)["input_ids"]


def train(net, tok, steps: int = 600) -> None:
    optimiser = torch.optim.AdamW(net.parameters(), lr=3e-3)
    rng = random.Random(0)
    net.train()
    for step in range(steps):
        batch = [" ".join(sequence(TASKS[k % 3], rng)) for k in range(step * 48, step * 48 + 48)]
        ids = encode(tok, batch)
        out = net(input_ids=ids, labels=ids)
        optimiser.zero_grad()
        (out.loss + (out.aux_loss if out.aux_loss is not None else 0)).backward()
        optimiser.step()
    net.eval()


def held_out_loss(folder_or_model, tok) -> dict[str, float]:
    """Mean cross-entropy over the second half of held-out sequences, per task."""
    from transformers import AutoModelForCausalLM

    net = (
        AutoModelForCausalLM.from_pretrained(folder_or_model) if isinstance(folder_or_model, Path) else folder_or_model
    )
    net.eval()
    out = {}
    with torch.no_grad():
        for task in TASKS:
            ids = encode(tok, texts(task, 200, seed=99))
            logits = net(input_ids=ids).logits[:, LENGTH:-1]  # predicting the second half
            target = ids[:, LENGTH + 1 :]
            out[task] = float(torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1)))
    return out


def random_slim(source: Path, out: Path, k: int, seed: int) -> None:
    """K experts per block chosen at random, written by the same writer as slim-experts."""
    from weightlab.io.open import open_weights
    from weightlab.io.writer import CheckpointWriter
    from weightlab.options import SlimExpertsOptions
    from weightlab.surgery.slim_experts import plan_slimming, slim_experts, slimmed_tensors

    ckpt = open_weights(source)
    options = SlimExpertsOptions(experts=k, by="prune")
    planned, counts = plan_slimming(ckpt, options)
    rng = random.Random(seed)
    for block in planned.values():
        kept = sorted(rng.sample(range(block.experts), k))
        block.groups, block.weights = [[e] for e in kept], [[1.0] for _ in kept]
        block.dropped = sorted(set(range(block.experts)) - set(kept))
    raw = json.loads((source / "config.json").read_text())
    config = json.dumps({**raw, **counts})
    with CheckpointWriter(
        out, donor=source, plan=slimmed_tensors(ckpt, planned)[0], files={"config.json": config}
    ) as w:
        slim_experts(ckpt, planned, counts, w, str(out), options)


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="slim-quality-"))
    tok = tokenizer(work / "trained")
    net = model()
    train(net, tok)
    net.config.output_router_logits = False
    net.save_pretrained(work / "trained")
    (work / "calibration.txt").write_text("\n".join(t for task in TASKS for t in texts(task, 24, seed=5)) + "\n")
    rows = {"full model (8 experts)": held_out_loss(net, tok)}
    ways = {
        "merge (weights)": dict(by="merge"),
        "prune (weights)": dict(by="prune"),
        "prune (REAP)": dict(by="prune", calibration=work / "calibration.txt"),
        "merge (routed share)": dict(by="merge", calibration=work / "calibration.txt"),
    }
    for k in (6, 4):
        for label, options in ways.items():
            out = work / f"{label.split()[0]}-{k}-{len(options)}"
            wl.slim_experts(work / "trained", out=out, experts=k, **options)
            rows[f"{label}, {k} experts"] = held_out_loss(out, tok)
        runs = []
        for seed in range(3):
            out = work / f"random-{k}-{seed}"
            random_slim(work / "trained", out, k, seed)
            runs.append(held_out_loss(out, tok))
        rows[f"random, {k} experts (3 seeds)"] = {t: sum(r[t] for r in runs) / len(runs) for t in TASKS}
    for scores in rows.values():
        scores["mean"] = sum(scores[t] for t in TASKS) / len(TASKS)
    uniform = float(torch.log(torch.tensor(float(VOCAB))))
    result = {"uniform_guess_loss": uniform, "held_out_loss": rows}
    path = ROOT / "benchmarks" / "results" / "slim_quality.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print("| slimmed | " + " | ".join(TASKS) + " | mean |\n|---|" + "---|" * (len(TASKS) + 1))
    for label, scores in rows.items():
        print(f"| {label} | " + " | ".join(f"{scores[t]:.3f}" for t in [*TASKS, "mean"]) + " |")
    print(f"uniform guess: {uniform:.3f}")


if __name__ == "__main__":
    main()
