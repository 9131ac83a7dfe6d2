"""Recipes of several merges (mergekit's `mergekit-multi`): YAML documents, each a recipe (ours or
mergekit's) with a `name`, a later one naming an earlier one's output as a model. They run in one
command, in the order their references need; the output is the stage no name refers to (the
unnamed one, or the one no other stage reads); the others are written beside it and removed at
the end. The output's `weightlab_merge.yml` holds every stage, so it replays the whole.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from weightlab.errors import CheckpointNotFound, InvalidArgument, shown
from weightlab.io.atomic import scratch_folder
from weightlab.io.memory import StateDictWriter
from weightlab.io.yaml_file import read_yaml_documents
from weightlab.merging.config import RECORD, MergeConfig, build_config
from weightlab.merging.recipes import recipe_options
from weightlab.merging.run import MergeReport, merge

STAGES_RECORD = "weightlab_stages.json"  # each earlier stage's report, in the output
STAGES_HEADER = "# weightlab merge --config THIS_FILE -o OUT runs these merges again, each stage after those it reads\n"


@dataclass(frozen=True)
class Stage:
    name: str | None
    config: MergeConfig  # its models and base may name other stages


def load_stages(path: str | Path) -> list[Stage] | None:
    """Every document of a recipe file as a stage, in the order they run (the output's last);
    None for a file of one recipe (`recipes.load_config` reads it)."""
    if not Path(path).exists():
        raise CheckpointNotFound("--config: no such file", path)
    documents = read_yaml_documents(path)
    if len(documents) < 2:
        return None
    stages = []
    for i, data in enumerate(documents):
        if not isinstance(data, dict):
            raise InvalidArgument(f"document {i + 1}: a merge config is a mapping of keys to values", path)
        name = data.get("name")
        if name is not None and not (isinstance(name, str) and name):
            raise InvalidArgument(f"document {i + 1}: name must be text, got {shown(name)}", path)
        options = recipe_options({k: v for k, v in data.items() if k != "name"}, path)
        stages.append(Stage(name, build_config(options)))
    return ordered(stages, path)


def ordered(stages: list[Stage], path: str | Path) -> list[Stage]:
    """Stages in an order where each runs after those it reads; the output stage last."""
    names = [s.name for s in stages if s.name is not None]
    if len(set(names)) != len(names):
        raise InvalidArgument("two stages have the same name", path)
    if sum(s.name is None for s in stages) > 1:
        raise InvalidArgument("more than one stage has no name: name all but the output", path)
    reads = {id(s): [m for m in s.config.referenced() if m in names] for s in stages}
    read_by_others = {m for s in stages for m in reads[id(s)]}
    finals = [s for s in stages if s.name is None] or [s for s in stages if s.name not in read_by_others]
    if len(finals) != 1:
        raise InvalidArgument("no single stage is the output: leave exactly one unnamed, or unread by the others", path)
    done: list[Stage] = []
    pending = list(stages)
    while pending:
        ready = [s for s in pending if all(m in {d.name for d in done} for m in reads[id(s)])]
        if not ready:
            raise InvalidArgument(
                f"stages read each other in a circle: {', '.join(str(s.name) for s in pending)}", path
            )
        for s in ready:
            pending.remove(s)
        done += [s for s in ready if s is not finals[0]] + [s for s in ready if s is finals[0]]
    done.remove(finals[0])
    return [*done, finals[0]]


def stages_record(stages: list[Stage]) -> str:
    """Every stage's record, a YAML document each (`name` first), as `load_stages` reads them."""
    docs = [{**({"name": s.name} if s.name is not None else {}), **s.config.record()} for s in stages]
    return STAGES_HEADER + str(yaml.safe_dump_all(docs, sort_keys=False, allow_unicode=True))


def stage_paths(stages: list[Stage], folder: Path) -> dict[str, str]:
    """Where each stage but the output is written, inside `folder`."""
    return {str(s.name): str(folder / f"stage-{i}") for i, s in enumerate(stages[:-1])}


def run_stages(
    stages: list[Stage],
    target: str | Path | StateDictWriter,
    scratch: Path | None,
    **options: Any,
) -> MergeReport:
    """Run the stages in order, each but the last into a private folder in `scratch` (removed at
    the end; None: the system's temporary folder), the last into `target` with every stage's
    record: `weightlab_merge.yml` (all stages, replayable) and `weightlab_stages.json` (each earlier
    stage's report). `options` go to every `run.merge`."""
    with scratch_folder(scratch, ".weightlab-stages-") as folder:
        outputs = stage_paths(stages, folder)
        reports = {}
        for stage in stages[:-1]:
            assert stage.name is not None  # every stage but the output is named (`ordered`)
            report = merge(stage.config.renamed(outputs), outputs[stage.name], recorded=stage.config, **options)
            reports[stage.name] = {k: v for k, v in report.to_dict().items() if k not in ("out", "seconds")}
        final = stages[-1]
        records = {RECORD: stages_record(stages), STAGES_RECORD: json.dumps(reports, indent=2) + "\n"}
        return merge(final.config.renamed(outputs), target, recorded=final.config, records=records, **options)
