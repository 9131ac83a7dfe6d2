"""A hostile and careless user's corpus, across every command: each case states the exit code,
a fragment of the one-line message, files that must and must not exist afterwards; and every
file that existed before is byte-identical afterwards unless the case replaces it on purpose."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import exit_code, hub_repo
from safetensors.torch import load_file, save_file

import weightlab as wl
from weightlab import synthetic
from weightlab.examples import minilm_path


@dataclass(frozen=True)
class Case:
    id: str
    args: str  # split on spaces; run inside a fresh copy of the workspace
    code: int
    message: str = ""  # fragment of stderr (exit 2) or of stdout (exit 0)
    exists: tuple[str, ...] = ()
    absent: tuple[str, ...] = ()
    replaces: tuple[str, ...] = ()  # pre-existing files this case may change (an output --force replaces)


TA = "merge --method task-arithmetic --base base ft"
CASES = [
    # 1. outputs never destroy, contain or sit inside inputs; outputs never collide
    Case("json-onto-input-folder", "spectrum base ft --json ft --force", 2, "--json is the input ft"),
    Case(
        "json-inside-input",
        "spectrum base ft --json ft/spectrum.json",
        2,
        "lies inside the input ft",
        absent=("ft/spectrum.json",),
    ),
    Case("json-is-parent-of-inputs", "spectrum base ft --json . --force", 2, "contains the input"),
    Case("json-and-csv-same-file", "spectrum base ft --json o.txt --csv o.txt", 2, "collide", absent=("o.txt",)),
    Case("json-and-csv-both-stdout", "spectrum base ft --json - --csv -", 2, "both write to stdout"),
    Case("plots-and-json-same-path", "spectrum base ft --plots p --json p", 2, "collide", absent=("p",)),
    Case(
        "report-and-json-same-path", "spectrum base ft --json r.html --report r.html", 2, "collide", absent=("r.html",)
    ),
    Case("adapter-and-residual-same-folder", "init-lora base -o X --residual-out X", 2, "collide", absent=("X",)),
    Case("residual-inside-adapter", "init-lora base -o X --residual-out X/res", 2, "collide", absent=("X",)),
    Case(
        "adapter-inside-base",
        "init-lora base -o base/lora --no-residual",
        2,
        "lies inside the input base",
        absent=("base/lora",),
    ),
    Case("merge-into-input-file", f"{TA} -o ft/model.safetensors --force", 2, "lies inside the input ft"),
    Case("merge-onto-base", f"{TA} -o base --force", 2, "is the input base"),
    Case(
        "merge-onto-foreign-folder",
        f"{TA} -o userdir --force",
        2,
        "weightlab did not write",
        exists=("userdir/notes.txt",),
    ),
    Case("merge-onto-a-file", f"{TA} -o existing.json --force", 2, "not a folder"),
    Case("json-onto-foreign-folder", "spectrum base ft --json userdir --force", 2, "not a regular file"),
    Case("json-through-symlink", "spectrum base ft --json link.json --force", 2, "symbolic link"),
    Case("report-onto-its-input", "report spectrum.json -o spectrum.json --force", 2, "is the input"),
    Case("report-html-and-markdown-same", "report spectrum.json -o r.html --markdown r.html", 2, "collide"),
    Case("report-html-is-markdown-assets", "report spectrum.json -o r_assets --markdown r.md", 2, "collide"),
    Case("extract-onto-finetune", "extract-lora base ft -r 2 -o ft --force", 2, "is the input ft"),
    Case("tsd-save-inside-input", "tsd base ft --save ft/model.safetensors --force", 2, "lies inside the input ft"),
    Case("inspect-json-over-config", "inspect base --json base/config.json --force", 2, "lies inside the input base"),
    Case(
        "merge-via-config-into-model",
        "merge --config ta.yml -o ft/merged",
        2,
        "lies inside the input ft",
        absent=("ft/merged",),
    ),
    Case("existing-output-without-force", "spectrum base ft --json existing.json", 2, "already exists; pass --force"),
    Case(
        "force-replaces-a-regular-file",
        "spectrum base ft --json existing.json --force",
        0,
        "",
        exists=("existing.json",),
        replaces=("existing.json",),
    ),
    Case(
        "force-replaces-weightlabs-own-folder",
        f"{TA} -o out_old --force",
        0,
        "",
        exists=("out_old/model.safetensors", "out_old/.weightlab-output"),
        absent=("out_old/stale.txt",),
        replaces=("out_old/stale.txt", "out_old/.weightlab-output"),
    ),
    Case("demo-into-the-example-model", "demo --out {minilm} --force", 2, "is the input"),
    # 2. non-finite weights are never written; options that can only make garbage are refused
    Case("weights-nan", f"{TA} ft2 --weights nan,1 -o m", 2, "--weights nan", absent=("m",)),
    Case("lambda-inf", f"{TA} --lambda inf -o m", 2, "--lambda inf", absent=("m",)),
    Case(
        "average-weights-sum-zero",
        "merge --method average ft ft2 --weights 1,-1 -o m",
        2,
        "positive sum",
        absent=("m",),
    ),
    Case(
        "ties-negative-weights",
        "merge --method ties --base base ft ft2 --weights 1,-1 -o m",
        2,
        "non-negative",
        absent=("m",),
    ),
    Case("lora-alpha-zero", "init-lora base --alpha 0 -o X --no-residual", 2, "--alpha 0", absent=("X",)),
    Case("lambda-beyond-float32", f"{TA} --lambda 1e300 -o m", 2, "--lambda 1e+300", absent=("m",)),
    Case(
        "task-vector-overflows-float32",
        "merge --method task-arithmetic --base huge_neg huge_pos -o m",
        2,
        "error: m: tensor",
        absent=("m",),
    ),
    Case(
        "fp16-output-overflows",
        "merge --method task-arithmetic --base zbase big --dtype float16 -o m",
        2,
        "NaN or Inf",
        absent=("m",),
    ),
    Case("model-holding-nan", "merge --method task-arithmetic --base base nan_ft -o m", 2, "NaN or Inf", absent=("m",)),
    Case("spectrum-of-a-nan-model", "spectrum base nan_ft --json s.json", 2, "NaN or Inf", absent=("s.json",)),
    # 3. every option has a domain
    Case("k-zero", "spectrum base ft -k 0", 2, "-k 0: must be an integer ≥ 1"),
    Case("k-negative", "spectrum base ft -k -3", 2, "-k -3"),
    Case("keep-negative", "spectrum base ft --keep -1 --json s.json", 2, "--keep -1", absent=("s.json",)),
    Case("intruder-k-negative", "spectrum base ft --intruder-k -5", 2, "--intruder-k -5"),
    Case("epsilon-nan", "spectrum base ft --epsilon nan", 2, "--epsilon nan"),
    Case("rows-negative", "spectrum base ft --rows -1", 2, "--rows -1"),
    Case("k-not-a-number", "spectrum base ft -k abc", 2, "Invalid value for '-k'"),
    Case("unknown-option", "spectrum base ft --frobnicate", 2, "No such option"),
    Case("missing-argument", "spectrum", 2, "Missing argument"),
    Case("sample-size-zero", "gaussian ft --sample-size 0", 2, "--sample-size 0"),
    Case("gaussian-seed-negative", "gaussian ft --seed -1", 2, "--seed -1"),
    Case("extract-rank-zero", "extract-lora base ft -r 0 -o E", 2, "--rank 0", absent=("E",)),
    Case("extract-rank-negative", "extract-lora base ft -r -1 -o E", 2, "--rank -1", absent=("E",)),
    Case("extract-energy-zero", "extract-lora base ft --energy 0 -o E", 2, "--energy 0", absent=("E",)),
    Case("shard-size-overflow", f"{TA} --shard-size 1e400 -o m", 2, "--shard-size", absent=("m",)),
    Case("shard-size-nan", f"{TA} --shard-size nanGB -o m", 2, "--shard-size", absent=("m",)),
    Case("device-meta", "spectrum base ft --device meta", 2, "--device 'meta'"),
    Case("device-cuda-without-gpu", "spectrum base ft --device cuda:0", 2, "no CUDA GPU"),
    Case("compute-dtype-float16", "spectrum base ft --dtype float16", 2, "--dtype 'float16'"),
    Case("density-zero", "merge --method ties --base base ft --density 0 -o m", 2, "--density 0", absent=("m",)),
    Case(
        "density-above-one", "merge --method ties --base base ft --density 1.5 -o m", 2, "--density 1.5", absent=("m",)
    ),
    Case(
        "merge-seed-negative", "merge --method dare-linear --base base ft --density 0.5 --seed -5 -o m", 2, "--seed -5"
    ),
    Case("angles-side-unknown", "angles ft ft2 --side up", 2, "--side 'up'"),
    Case("include-bad-regex", "spectrum base ft --include (", 2, "--include '('"),
    Case("tsd-top-zero", "tsd base ft --top 0", 2, "--top 0"),
    Case(
        "nan-power-zero", "merge --method nan --base base ft ft2 --nan-power 0 -o m", 2, "--nan-power 0", absent=("m",)
    ),
    # 4. checkpoint parsing: exactly what the safetensors library accepts
    Case("unknown-dtype", "inspect bad/q17.safetensors", 2, "unknown dtype 'Q17'"),
    Case("negative-dim", "inspect bad/negative_dim.safetensors", 2, "not a list of non-negative integers"),
    Case("infinity-dim", "inspect bad/infinity_dim.safetensors", 2, "not valid JSON"),
    Case("float-dim", "inspect bad/float_dim.safetensors", 2, "not a list of non-negative integers"),
    Case("huge-dim", "inspect bad/huge_dim.safetensors", 2, "not a list of non-negative integers"),
    Case("overlapping-ranges", "inspect bad/overlap.safetensors", 2, "overlaps the previous tensor"),
    Case("gapped-ranges", "inspect bad/gap.safetensors", 2, "leaves a gap"),
    Case("duplicate-field", "inspect bad/duplicate_field.safetensors", 2, "repeats 'dtype'"),
    Case("deep-nesting", "inspect bad/deep.safetensors", 2, "bad/deep.safetensors"),
    Case("metadata-not-strings", "inspect bad/metadata_int.safetensors", 2, "is not a string"),
    Case("trailing-bytes", "inspect bad/trailing.safetensors", 2, "trailing bytes"),
    Case("truncated", "inspect bad/truncated.safetensors", 2, "truncated"),
    Case("empty-file", "inspect bad/empty.safetensors", 2, "shorter than a safetensors header"),
    # 5. a sharded index names files inside its folder only
    Case("index-traversal", "inspect evil_traversal", 2, "not a plain file name"),
    Case("index-absolute", "inspect evil_absolute", 2, "not a plain file name"),
    Case("index-non-string", "inspect evil_number", 2, "not a plain file name"),
    Case("index-symlink-escape", "inspect evil_link", 2, "leads out of the index's folder"),
    Case("index-weight-map-list", "inspect evil_list", 2, "'weight_map' is not an object"),
    Case("index-wrong-shard", "inspect evil_wrong_shard", 2, "does not hold it"),
    Case("index-tensor-in-two-shards", "inspect evil_two_shards", 2, "is in two shards"),
    # 6. adapter configs
    Case("adapter-r-string", "spectrum base adapter_r_string", 2, "r = 'four' is not a positive integer"),
    Case("adapter-r-null", "spectrum base adapter_r_null", 2, "r = None is not a positive integer"),
    Case("adapter-r-zero", "spectrum base adapter_r_zero", 2, "r = 0 is not a positive integer"),
    Case("adapter-alpha-string", "spectrum base adapter_alpha_string", 2, "lora_alpha = 'big'"),
    Case("adapter-config-list", "spectrum base adapter_list", 2, "not a JSON object"),
    Case("adapter-pattern-bad-regex", "spectrum base adapter_bad_regex", 2, "not a valid regular expression"),
    Case("adapter-rank-disagrees", "spectrum base adapter_rank_mismatch", 2, "has rank 4 but adapter_config gives r=8"),
    Case("adapter-as-base", "spectrum adapter ft", 2, "this is a LoRA adapter"),
    Case("esd-of-an-adapter-alone", "esd adapter", 2, "give it as a fine-tune of the model it adapts (with --base"),
    Case("merge-adapter-without-base", "merge --method average adapter ft -o m", 2, "give --base", absent=("m",)),
    # 7. YAML configs: types, not only keys
    Case(
        "yaml-density-mapping",
        "merge --config density_list.yml -o m",
        2,
        "density must be {filter: text, value",
        absent=("m",),
    ),
    Case("yaml-weights-string", "merge --config weights_string.yml -o m", 2, "weights must be a list", absent=("m",)),
    Case("yaml-seed-string", "merge --config seed_string.yml -o m", 2, "seed must be an int", absent=("m",)),
    Case("yaml-method-list", "merge --config method_list.yml -o m", 2, "method must be a str", absent=("m",)),
    Case(
        "yaml-model-without-model", "merge --config no_model.yml -o m", 2, "models[0] has no 'model' key", absent=("m",)
    ),
    Case("yaml-nan-block-ignored", "merge --config ties_with_nan.yml -o m", 2, "needs coeff: nan", absent=("m",)),
    Case(
        "mergekit-weight-missing", "merge --config mk_gradient.yml -o m", 2, "needs weight for ft (it has no default)"
    ),
    Case("mergekit-model-missing", "merge --config mk_no_model.yml -o m", 2, "models[1] has no 'model' key"),
    Case("yaml-not-a-mapping", "merge --config list.yml -o m", 2, "a merge config is a mapping"),
    # 8. everything else that used to give a traceback
    Case("text-file-named-pt", "inspect text.pt", 2, "not a torch file"),
    Case(
        "report-missing-fields", "report bad_result.json -o r.html", 2, "missing field 'matrices'", absent=("r.html",)
    ),
    Case(
        "report-mistyped-fields",
        "report mistyped_result.json -o r.html",
        2,
        "matrices is not a list",
        absent=("r.html",),
    ),
    Case("extract-against-other-architecture", "extract-lora base bert -r 2 -o E", 2, "another model", absent=("E",)),
    Case("donor-missing", f"{TA} --donor nowhere -o m", 2, "--donor: no such file", absent=("m",)),
    Case(
        "tsv-with-a-zero-size-tensor",
        "merge --method tsv --base zbase zft zft -o m",
        0,
        "",
        exists=("m/model.safetensors",),
    ),
    Case("missing-input", "spectrum base nowhere", 2, "nowhere: no such file"),
    Case("angles-adapter-without-base", "angles adapter ft", 2, "adapter"),
]

LONG = "x" * 245 + ".json"  # a legal 250-byte file name
COMMIT = "c" * 40
# The surfaces added since the first round (issue 21): each class of the issue, written fresh.
RM = "merge --method regmean ft ft2 --tokenizer tok -o out --calibration"
CASES += [
    # data-aware merges and --lambda auto (issue 25)
    Case(
        "regmean-without-calibration", "merge --method regmean ft ft2 -o out", 2, "give --calibration", absent=("out",)
    ),
    Case("regmean-empty-calibration", f"{RM} empty.txt", 2, "empty.txt: --calibration holds no text", absent=("out",)),
    Case("regmean-binary-calibration", f"{RM} binary.txt", 2, "binary, not text", absent=("out",)),
    Case("regmean-linked-calibration", f"{RM} calib_link.txt", 2, "symbolic link", absent=("out",)),
    Case("regmean-folder-calibration", f"{RM} calib_dir", 2, "regular text file", absent=("out",)),
    Case("regmean-missing-calibration", f"{RM} nowhere.txt", 2, "no such file", absent=("out",)),
    Case(
        "regmean-three-files-two-models",
        f"{RM} calib.txt --calibration calib.txt --calibration calib.txt",
        2,
        "3 times for 2 models",
        absent=("out",),
    ),
    Case(
        "regmean-nan-weight",
        "merge --method regmean ft nan_ft --tokenizer tok -o out --calibration calib.txt",
        2,
        "nan_ft",
        absent=("out",),
    ),
    Case(
        "regmean-no-tokenizer",
        "merge --method regmean ft ft2 --calibration calib.txt -o out",
        2,
        "no tokenizer among the inputs",
        absent=("out",),
    ),
    Case("regmean-tokenizer-not-one", f"{RM} calib.txt --tokenizer base", 2, "no tokenizer files", absent=("out",)),
    Case(
        "regmean-not-runnable",
        "merge --method fisher zbase zft --tokenizer tok -o out --calibration calib.txt",
        2,
        "no config.json",
        absent=("out",),
    ),
    Case("calibration-for-ties", f"{TA} ft2 --calibration calib.txt -o out", 2, "uses no data", absent=("out",)),
    Case(
        "regmean-as-adapter",
        "merge --as-adapter --method regmean --base base adapter adapter --calibration calib.txt -o out",
        2,
        "runs full models",
        absent=("out",),
    ),
    Case("regmean-on-ray", f"{RM} calib.txt --ray 127.0.0.1:9", 2, "", absent=("out",)),
    Case(
        "lambda-auto-cart", "merge --method cart ft ft2 --lambda auto -o out", 2, "has none to scale", absent=("out",)
    ),
    Case("lambda-word", f"{TA} --lambda lots -o out", 2, "give a number, or auto", absent=("out",)),
    Case(
        "ace-negative-ridge",
        f"{TA.replace('task-arithmetic', 'ace')} --param ridge=-1 -o out",
        2,
        "ridge",
        absent=("out",),
    ),
    # 1. a Hub ID never reads outside its repository's cache folder
    Case("hub-ref-climbs-out", "spectrum base org/refs-up", 2, "not a commit hash"),
    Case("hub-ref-absolute", "spectrum base org/refs-abs", 2, "not a commit hash"),
    Case("hub-ref-not-a-commit", "inspect org/not-a-commit", 2, "not a commit hash"),
    Case("hub-snapshot-links-out", "inspect org/snap-link", 2, "links followed"),
    Case(
        "hub-weights-link-out",
        "merge --method task-arithmetic --base base org/file-link -o outside/merged",
        2,
        "leads outside the repository",
        absent=("outside/merged",),
    ),
    Case("hub-config-links-out", "inspect org/config-link", 2, "leads outside the repository"),
    Case("hub-blobs-folder-links-out", "inspect org/blobs-link", 2, "leads outside the repository"),
    Case("hub-shard-links-out", "inspect org/shard-link", 2, "leads outside the repository"),
    Case("hub-index-weight-map-list", "inspect org/index-list", 2, "is not a plain file name"),
    Case("hub-good-repo-still-works", "inspect org/good", 0, "embed_tokens"),
    Case(
        "output-onto-a-linked-input-file",
        "spectrum base linked --json ft/model.safetensors --force",
        2,
        "is the input linked",
    ),
    # 2-3. the decomposition cache is an output for the planner: no collision, nothing inside inputs
    Case("cache-dir-is-json", "spectrum base ft --cache-dir c --json c", 2, "collide", absent=("c",)),
    Case("cache-dir-holds-plots", "spectrum base ft --cache-dir c --plots c/p", 2, "collide", absent=("c",)),
    Case("report-inside-cache-dir", "spectrum base ft --cache-dir c --report c/r.html", 2, "collide", absent=("c",)),
    Case("cache-dir-is-an-input", "spectrum base ft --cache-dir ft", 2, "--cache-dir is the input ft"),
    Case(
        "cache-dir-inside-an-input",
        "spectrum base ft --cache-dir base/c",
        2,
        "lies inside the input base",
        absent=("base/c",),
    ),
    Case("cache-dir-holds-inputs", "spectrum base ft --cache-dir .", 2, "--cache-dir contains the input"),
    # 4. --ray fails fast and clearly
    Case(
        "ray-nobody-listens",
        "spectrum base ft --ray 127.0.0.1:1 --ray-timeout 5",
        2,
        "cannot reach a Ray cluster at 127.0.0.1:1",
    ),
    Case("ray-not-an-address", "spectrum base ft --ray bad:addr:x", 2, "not a Ray address"),
    Case("ray-merge-nobody-listens", f"{TA} --ray 127.0.0.1:1 --ray-timeout 5 -o m", 2, "cannot reach", absent=("m",)),
    Case("ray-timeout-zero", "spectrum base ft --ray 127.0.0.1:1 --ray-timeout 0", 2, "--ray-timeout 0: must be"),
    Case("ray-timeout-without-ray", "compare --base base ft ft2 --ray-timeout 5", 2, "it needs --ray"),
    # 5. every tensor of an adapter is understood, or the adapter is refused naming it
    Case("adapter-dora-magnitude", "spectrum base adapter_magnitude", 2, "lora_magnitude_vector"),
    Case("adapter-bias-without-flag", "compare --base base adapter_stray_bias ft", 2, "lora_bias: true"),
    Case("adapter-base-layer-of-unadapted", "spectrum base adapter_stray_base_layer", 2, "without LoRA factors"),
    Case(
        "adapter-unlisted-module",
        "merge --as-adapter --method task-arithmetic --base base adapter adapter_unlisted -o m",
        2,
        "modules_to_save",
        absent=("m",),
    ),
    Case("adapter-modules-to-save-string", "spectrum base adapter_save_string", 2, "modules_to_save = 'norm'"),
    Case(
        "adapters-disagree-on-lora-bias",
        "merge --as-adapter --method task-arithmetic --base bert bert_adapter bert_bias -o m",
        2,
        "disagree on lora_bias",
        absent=("m",),
    ),
    Case(
        "saved-modules-merged-without-base",
        "merge --as-adapter --method average bert_bias bert_bias2 -o m",
        2,
        "give --base",
        absent=("m",),
    ),
    # 6. compare over a bank that does not match
    Case("compare-another-architecture", "compare --base base ft bert", 2, "shares no tensor name"),
    Case(
        "compare-a-model-lacks-a-matrix",
        "compare --base base ft ft_missing --json c.json",
        0,
        "missing from ft_missing",
        exists=("c.json",),
    ),
    # 7. degenerate adapter merges
    Case(
        "merge-zero-adapters-ties",
        "merge --as-adapter --method ties --base base zero_ad zero_ad2 -o m",
        2,
        "change nothing",
        absent=("m",),
    ),
    Case(
        "merge-zero-adapters-tsv",
        "merge --as-adapter --method tsv --base base zero_ad zero_ad2 -o m",
        2,
        "change nothing",
        absent=("m",),
    ),
    Case(
        "merge-adapters-zero-weights",
        "merge --as-adapter --method task-arithmetic --base base adapter adapter --weights 0,0 -o m",
        2,
        "change nothing",
        absent=("m",),
    ),
    # 8. an option that does not apply is refused
    Case(
        "extract-allocation-without-budget",
        "extract-lora base ft --rank-allocation entropy -r 2 -o E",
        2,
        "--rank-allocation says how --rank-budget is shared",
        absent=("E",),
    ),
    Case(
        "init-allocation-without-budget",
        "init-lora base --rank-allocation entropy -o X --no-residual",
        2,
        "--rank-allocation",
        absent=("X",),
    ),
    Case(
        "init-rank-with-budget",
        "init-lora base -r 4 --rank-budget 40 -o X --no-residual",
        2,
        "--rank does not apply with --rank-budget",
        absent=("X",),
    ),
    Case(
        "init-from-without-tsd",
        "init-lora base --from ft -o X --no-residual",
        2,
        "--from gives the warm-up",
        absent=("X",),
    ),
    Case("init-seed-exact-svd", "init-lora base --seed 3 -o X --no-residual", 2, "--seed seeds only", absent=("X",)),
    Case(
        "init-initial-alone",
        "init-lora base --initial adapter -o X --no-residual",
        2,
        "needs --as-plain-lora",
        absent=("X",),
    ),
    Case(
        "init-residual-and-no-residual",
        "init-lora base -o X --residual-out R --no-residual",
        2,
        "contradict",
        absent=("X", "R"),
    ),
    Case(
        "init-plain-lora-with-rank",
        "init-lora --as-plain-lora adapter --initial adapter -r 4 -o X",
        2,
        "--rank does not apply to --as-plain-lora",
        absent=("X",),
    ),
    Case("spectrum-epsilon-values-only", "spectrum base ft --values-only --epsilon 0.3", 2, "--epsilon does not apply"),
    Case("spectrum-k-on-one-checkpoint", "spectrum base --values-only -k 3", 2, "--top-k does not apply"),
    Case(
        "spectrum-cache-size-no-cache", "spectrum base ft --no-cache --cache-size 1", 2, "--cache-size does not apply"
    ),
    Case("esd-seed-without-traps", "esd ft --no-traps --seed 2", 2, "--seed does not apply with --no-traps"),
    Case("angles-seed-exact-svd", "angles base ft --seed 2", 2, "--seed seeds only --svd randomized"),
    Case(
        "merge-seed-without-randomness",
        f"{TA} --seed 3 -o m",
        2,
        "task-arithmetic draws nothing at random",
        absent=("m",),
    ),
    Case(
        "merge-adapter-donor",
        "merge --as-adapter --method task-arithmetic --base base adapter --donor base -o m",
        2,
        "--donor does not apply to --as-adapter",
        absent=("m",),
    ),
    Case(
        "merge-adapter-shard-size",
        "merge --as-adapter --method task-arithmetic --base base adapter --shard-size 1GB -o m",
        2,
        "--shard-size does not apply",
        absent=("m",),
    ),
    Case(
        "merge-adapter-ray",
        "merge --as-adapter --method task-arithmetic --base base adapter --ray auto -o m",
        2,
        "--ray does not apply",
        absent=("m",),
    ),
    # 10. awkward paths: one line, and any legal name works
    Case("missing-path-with-newline", "spectrum base no\nwhere", 2, "no\\nwhere: no such file"),
    Case("output-name-of-250-bytes", f"spectrum base ft --json {LONG}", 0, "", exists=(LONG,)),
    Case("merge-into-250-byte-name", f"{TA} -o {'m' * 250}", 0, "", exists=(f"{'m' * 250}/model.safetensors",)),
    # 12. non-string weight_map values, the whole family, through the one validator
    Case("index-values-lists", "inspect evil_wm_list", 2, "not a plain file name"),
    Case("index-values-objects", "spectrum base evil_wm_object", 2, "not a plain file name"),
    Case("index-values-null", "inspect evil_wm_null", 2, "not a plain file name"),
    Case("index-values-true", "inspect evil_wm_true", 2, "not a plain file name"),
    Case("index-values-empty", "inspect evil_wm_empty", 2, "not a plain file name"),
]

# The newest surfaces, tried with hostile and careless input (issue 35): a case per class.
CASES += [
    # 7. YAML cannot stall the reader: aliases expand to a bounded document, messages show bounded values
    Case(
        "yaml-billion-laughs-mergekit",
        "merge --config bomb_mk.yml -o m",
        2,
        "aliases expand to more than",
        absent=("m",),
    ),
    Case(
        "yaml-billion-laughs-seed", "merge --config bomb_seed.yml -o m", 2, "aliases expand to more than", absent=("m",)
    ),
    Case("yaml-recursive-alias", "merge --config recursive.yml -o m", 2, "contains it", absent=("m",)),
    Case(
        "yaml-aliased-seed-shown-short", "merge --config aliased_seed.yml -o m", 2, "seed must be an int", absent=("m",)
    ),
    Case("yaml-config-missing", "merge --config nowhere.yml -o m", 2, "nowhere.yml: --config: no such file"),
    # 8. a module of modules_to_save covers every tensor below it (PEFT's rule)
    Case("adapter-saves-a-parent-module", "spectrum bert bert_pooler --json s.json", 0, "", exists=("s.json",)),
    # 9. --cache-dir that cannot be a folder: one line about --cache-dir
    Case("cache-dir-is-a-file", "spectrum base ft --cache-dir existing.json", 2, "--cache-dir is a file, not a folder"),
    Case("cache-dir-below-a-file", "spectrum base ft --cache-dir existing.json/c", 2, "--cache-dir lies below"),
    Case("json-below-a-file", "spectrum base ft --json existing.json/s.json", 2, "--json lies below"),
    # 4. --lambda auto applies in every route, or is refused
    Case(
        "lambda-auto-as-adapter",
        "merge --as-adapter --method task-arithmetic --base base adapter adapter --lambda auto -o m",
        0,
        "λ auto: mean 0.5",
        exists=("m/adapter_model.safetensors",),
    ),
    Case(
        "lambda-auto-negative-weights",
        f"{TA} ft2 --weights 1,-0.5 --lambda auto -o m",
        0,
        "λ auto: mean 0.667",
        exists=("m/model.safetensors",),
    ),
    # 5. a config.json is not trusted for sizes: checked against the weights before allocating
    Case(
        "regmean-config-lies-about-sizes",
        f"{RM.replace('ft ft2', 'lying ft2')} calib.txt",
        2,
        "lying/config.json: tensor 'embed_tokens.weight': the config gives",
        absent=("out",),
    ),
    # 6. calibration text is bounded: one long line costs what the model keeps of it
    Case("regmean-one-long-line", f"{RM} long_line.txt", 0, "merged", exists=("out/model.safetensors",)),
    Case("regmean-too-many-lines", f"{RM} many_lines.txt", 2, "give a sample", absent=("out",)),
]
# Every mergekit recipe runs, or is refused naming what differs (issue 36)
CASES += [
    Case("mk-frankenmerge", "merge --config mk_franken.yml -o m", 0, "merged", exists=("m/config.json",)),
    Case(
        "mk-layer-range-beyond",
        "merge --config mk_range.yml -o m",
        2,
        "is not a range of the model's layers",
        absent=("m",),
    ),
    Case("mk-modules", "merge --config mk_modules.yml -o m", 2, "modules: (models of several modules)", absent=("m",)),
    Case("mk-residual-weight", "merge --config mk_residual.yml -o m", 2, "never uses it", absent=("m",)),
    Case("mk-lora-plus", "merge --config mk_plus.yml -o m", 2, "applies a LoRA to a model", absent=("m",)),
    Case("mk-named-template", "merge --config mk_template.yml -o m", 2, "named templates", absent=("m",)),
    Case(
        "mk-shared-under-model", "merge --config mk_shared.yml -o m", 2, "t is one value for all models", absent=("m",)
    ),
    Case("mk-stages-circle", "merge --config mk_circle.yml -o m", 2, "circle", absent=("m",)),
    Case("mk-stage-options", "merge --config mk_two.yml --lambda 2 -o m", 2, "each stage's options", absent=("m",)),
    Case("mk-tokenizer-no-tokenizer", "merge --config mk_vocab.yml -o m", 2, "tokenizer", absent=("m",)),
]
# GGUF and quantized checkpoints, and what quantization did (issue 37)
CASES += [  # Mixture-of-Experts: experts, slim-experts, build-moe, --match-experts
    Case("experts-of-a-dense-model", "experts base", 2, "no Mixture-of-Experts block"),
    Case("experts-hole", "experts moe_hole", 2, "experts [2] have no up_proj"),
    Case("experts-ragged", "experts moe_ragged", 2, "differ in shape"),
    Case("experts-base-of-another-model", "experts moe --base base", 2, "not this MoE's base"),
    Case(
        "experts-tokenizer-without-text", "experts moe --tokenizer base", 2, "--tokenizer applies to --calibration only"
    ),
    Case("experts-dtype-refused", "experts moe --dtype float64", 2, "No such option"),
    Case("experts-ok", "experts moe --json e.json", 0, "near copies", exists=("e.json",)),
    Case("slim-no-k", "slim-experts moe -o s", 2, "--experts K", absent=("s",)),
    Case("slim-below-top-k", "slim-experts moe --experts 1 -o s", 2, "keep at least 2", absent=("s",)),
    Case("slim-all", "slim-experts moe --experts 4 -o s", 2, "keep fewer", absent=("s",)),
    Case("slim-inside-input", "slim-experts moe --experts 2 -o moe/slim", 2, "inside the input", absent=("moe/slim",)),
    Case("slim-dense", "slim-experts base --experts 2 -o s", 2, "no Mixture-of-Experts block", absent=("s",)),
    Case("slim-ok", "slim-experts moe --experts 2 -o s", 0, "experts = 2 → s", exists=("s/config.json",)),
    Case("build-moe-deepseek", "build-moe moe_deepseek.yml -o m", 2, "remote code", absent=("m",)),
    Case("build-moe-typo", "build-moe moe_typo.yml -o m", 2, "experts_per_tokens", absent=("m",)),
    Case("build-moe-list", "build-moe moe_list.yml -o m", 2, "is a mapping", absent=("m",)),
    Case("build-moe-seed-unused", "build-moe moe_ok.yml -o m --seed 3", 2, "--seed does not apply", absent=("m",)),
    Case("build-moe-ok", "build-moe moe_ok.yml -o m", 0, "Mixtral with 3 experts", exists=("m/config.json",)),
    Case("match-experts-dense", "merge --method average base ft --match-experts -o mm", 2, "no Mixture-of-Experts"),
    Case(
        "match-experts-adapter",
        "merge --method task-arithmetic --base base adapter --as-adapter --match-experts -o mm",
        2,
        "does not apply to --as-adapter",
    ),
]

CASES += [
    Case("gguf-truncated", "inspect cut.gguf", 2, "the file is truncated or the shape is wrong"),
    Case("gguf-lying-shape", "spectrum q8.gguf lying.gguf", 2, "tensor 'blk.0.attn_q.weight': Q8_0 [6400, 64]"),
    Case("gguf-unknown-type", "esd unknown_type.gguf", 2, "GGML type 99 is not one weightlab reads"),
    Case("gguf-offset-past-end", "inspect far.gguf", 2, "needs bytes"),
    Case("gguf-nan-scale", "quant-error q8.gguf nan_scale.gguf", 2, "NaN or Inf"),
    Case("gguf-unknown-arch", "inspect mamba.gguf", 2, "architecture 'mamba' has no Hugging Face mapping"),
    Case("gguf-two-in-a-folder", "inspect two_gguf", 2, "2 GGUF files"),
    Case("gguf-renamed-is-read", "inspect weights.bin", 0, "Q8_0"),
    Case("quant-error-missing", "quant-error base nothing_here", 2, "no such file or folder"),
    Case(
        "quant-error-lora-is-weights", "quant-error base ft --lora ft", 2, "--lora is full weights, not a LoRA adapter"
    ),
    Case("quant-error-no-cache-dir", "quant-error base ft --no-cache --cache-dir c", 2, "does not apply"),
    Case("quant-error-json-onto-input", "quant-error base ft --json ft --force", 2, "--json is the input ft"),
    Case(
        "quant-error-merge-gguf",
        "merge --method average q8.gguf q8.gguf -o qm",
        0,
        "is quantized (Q8_0)",
        exists=("qm/config.json",),
    ),
]


def _st(path: Path, header: bytes | dict, data: bytes = b"") -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _entry(dtype: str, shape, offsets) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


def _adapter_variant(source: Path, dest: Path, **changes) -> None:
    shutil.copytree(source, dest)
    config = json.loads((dest / "adapter_config.json").read_text())
    config.update(changes)
    (dest / "adapter_config.json").write_text(json.dumps(config))


def _index_folder(root: Path, name: str, weight_map) -> None:
    folder = root / name
    folder.mkdir()
    shutil.copy(root / "base" / "model.safetensors", folder / "model-00001-of-00001.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture(scope="module")
def template(zoo, adapters, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile")
    for name, key in (("base", "llama"), ("ft", "llama_ft"), ("bert", "bert")):
        shutil.copytree(zoo[key], root / name)
    synthetic.save(synthetic.finetune(synthetic.tiny_model("llama", seed=0), steps=3, seed=7), root / "ft2")
    shutil.copytree(adapters["llama"], root / "adapter")
    names = json.loads(
        (root / "base" / "model.safetensors").read_bytes()[
            8 : 8 + struct.unpack("<Q", (root / "base" / "model.safetensors").read_bytes()[:8])[0]
        ]
    )
    tensor_names = [n for n in names if n != "__metadata__"]

    # a fine-tune with a NaN in one weight
    state = {n: t for n, t in synthetic.tiny_model("llama", seed=0).state_dict().items()}
    state["layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    (root / "nan_ft").mkdir()
    save_file({n: t.contiguous() for n, t in state.items()}, root / "nan_ft" / "model.safetensors")
    shutil.copy(root / "base" / "config.json", root / "nan_ft" / "config.json")
    # checkpoints with a zero-size matrix
    for name, value in (("zbase", 1.0), ("zft", 1.01), ("big", 1e5), ("huge_neg", -3e38), ("huge_pos", 3e38)):
        (root / name).mkdir()
        save_file(
            {"w.weight": torch.full((4, 4), value), "empty.weight": torch.zeros(0, 4)},
            root / name / "model.safetensors",
        )

    bad = root / "bad"
    bad.mkdir()
    _st(bad / "q17.safetensors", {"a": _entry("Q17", [2], [0, 8])}, b"\0" * 8)
    _st(bad / "negative_dim.safetensors", {"a": _entry("F32", [-2], [0, 8])}, b"\0" * 8)
    _st(bad / "infinity_dim.safetensors", b'{"a":{"dtype":"F32","shape":[Infinity],"data_offsets":[0,8]}}', b"\0" * 8)
    _st(bad / "float_dim.safetensors", {"a": _entry("F32", [2.0], [0, 8])}, b"\0" * 8)
    _st(bad / "huge_dim.safetensors", {"a": _entry("F32", [2**64], [0, 8])}, b"\0" * 8)
    _st(bad / "overlap.safetensors", {"a": _entry("F32", [2], [0, 8]), "b": _entry("F32", [1], [4, 8])}, b"\0" * 8)
    _st(bad / "gap.safetensors", {"a": _entry("F32", [1], [4, 8])}, b"\0" * 8)
    _st(
        bad / "duplicate_field.safetensors",
        b'{"a":{"dtype":"F32","dtype":"F16","shape":[2],"data_offsets":[0,8]}}',
        b"\0" * 8,
    )
    _st(bad / "deep.safetensors", b"[" * 200_000 + b"]" * 200_000)
    _st(bad / "metadata_int.safetensors", {"__metadata__": {"step": 5}, "a": _entry("F32", [2], [0, 8])}, b"\0" * 8)
    _st(bad / "trailing.safetensors", {"a": _entry("F32", [2], [0, 8])}, b"\0" * 9)
    good = (root / "base" / "model.safetensors").read_bytes()
    (bad / "truncated.safetensors").write_bytes(good[:-100])
    (bad / "empty.safetensors").write_bytes(b"")

    _index_folder(root, "evil_traversal", {n: "../base/model.safetensors" for n in tensor_names})
    _index_folder(root, "evil_absolute", {n: "/etc/passwd" for n in tensor_names})
    _index_folder(root, "evil_number", {n: 5 for n in tensor_names})
    _index_folder(root, "evil_list", [["a", "b"]])
    _index_folder(
        root,
        "evil_wrong_shard",
        {**{n: "model-00001-of-00001.safetensors" for n in tensor_names}, tensor_names[0]: "other.safetensors"},
    )
    save_file({"unrelated": torch.zeros(2)}, root / "evil_wrong_shard" / "other.safetensors")
    _index_folder(root, "evil_two_shards", {n: "model-00001-of-00001.safetensors" for n in tensor_names})
    shutil.copy(root / "base" / "model.safetensors", root / "evil_two_shards" / "copy.safetensors")
    index = json.loads((root / "evil_two_shards" / "model.safetensors.index.json").read_text())
    index["weight_map"][tensor_names[0]] = "copy.safetensors"
    (root / "evil_two_shards" / "model.safetensors.index.json").write_text(json.dumps(index))
    _index_folder(root, "evil_link", {n: "escape.safetensors" for n in tensor_names})
    (root / "evil_link" / "model-00001-of-00001.safetensors").unlink()
    (root / "evil_link" / "escape.safetensors").symlink_to(root / "base" / "model.safetensors")

    synthetic.tiny_tokenizer(root / "tok")  # calibration text for the data-aware merges
    (root / "calib.txt").write_text("\n".join(synthetic.tiny_texts(4)) + "\n")
    (root / "empty.txt").write_text("\n \n")
    (root / "binary.txt").write_bytes(b"w1 w2\x00\xff\n")
    (root / "calib_link.txt").symlink_to("calib.txt")
    (root / "calib_dir").mkdir()
    (root / "calib_dir" / "a.txt").write_text("w1\n")
    _adapter_variant(root / "adapter", root / "adapter_r_string", r="four")
    _adapter_variant(root / "adapter", root / "adapter_r_null", r=None)
    _adapter_variant(root / "adapter", root / "adapter_r_zero", r=0)
    _adapter_variant(root / "adapter", root / "adapter_alpha_string", lora_alpha="big")
    _adapter_variant(root / "adapter", root / "adapter_bad_regex", rank_pattern={"(": 2})
    _adapter_variant(root / "adapter", root / "adapter_rank_mismatch", r=8)
    shutil.copytree(root / "adapter", root / "adapter_list")
    (root / "adapter_list" / "adapter_config.json").write_text("[1, 2]")

    yamls = {
        "density_list.yml": "method: ties\nbase: base\nmodels: [ft, ft2]\ndensity: {low: 0.1}\n",
        "weights_string.yml": "method: task-arithmetic\nbase: base\nmodels: [ft, ft2]\nweights: ab\n",
        "seed_string.yml": "method: dare-linear\nbase: base\nmodels: [ft]\ndensity: 0.5\nseed: x\n",
        "method_list.yml": "method: [ties]\nbase: base\nmodels: [ft]\n",
        "no_model.yml": "method: task-arithmetic\nbase: base\nmodels:\n  - weight: 1\n",
        "ties_with_nan.yml": "method: ties\nbase: base\nmodels: [ft, ft2]\ndensity: 0.5\n"
        "nan:\n  norm_of: task-vectors\n",
        "mk_gradient.yml": "merge_method: ties\nbase_model: base\nmodels:\n  - model: ft\n"
        "parameters:\n  density: [0.1, 0.9]\n",
        "mk_no_model.yml": "merge_method: linear\nmodels:\n  - model: ft\n  - parameters: {weight: 1}\n",
        "list.yml": "- ties\n- base\n",
        "ta.yml": "method: task-arithmetic\nbase: base\nmodels: [ft]\n",
    }
    for name, text in yamls.items():
        (root / name).write_text(text)
    (root / "text.pt").write_text("hello, this is not a checkpoint\n")
    (root / "userdir").mkdir()
    (root / "userdir" / "notes.txt").write_text("my notes\n")
    (root / "existing.json").write_text("{}\n")
    (root / "link.json").symlink_to(root / "existing.json")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert exit_code(["spectrum", "base", "ft", "--json", "spectrum.json"]) == 0
        assert exit_code([*TA.split(), "-o", "out_old"]) == 0
    finally:
        os.chdir(cwd)
    result = json.loads((root / "spectrum.json").read_text())
    (root / "bad_result.json").write_text(json.dumps({k: v for k, v in result.items() if k != "matrices"}))
    (root / "mistyped_result.json").write_text(json.dumps({**result, "matrices": "many"}))
    (root / "out_old" / "stale.txt").write_text("from an earlier run\n")
    _new_surfaces(root, zoo, adapters, tensor_names)
    _newest_surfaces(root)
    _gguf_surfaces(root)
    _moe_surfaces(root)
    return root


def _hub_repo(hub: Path, name: str, ref: str | None = COMMIT) -> Path:
    return hub_repo(hub, name, ref)


def _with_tensors(source: Path, dest: Path, change, config: dict | None = None) -> None:
    """A copy of an adapter folder with its tensors edited by `change` (and its config updated)."""
    shutil.copytree(source, dest)
    tensors = {n: t.clone() for n, t in load_file(dest / "adapter_model.safetensors").items()}
    change(tensors)
    save_file(tensors, dest / "adapter_model.safetensors")
    if config:
        cfg = json.loads((dest / "adapter_config.json").read_text())
        (dest / "adapter_config.json").write_text(json.dumps({**cfg, **config}))


def _new_surfaces(root: Path, zoo, adapters, tensor_names: list[str]) -> None:
    from peft import LoraConfig, get_peft_model

    # a Hugging Face cache with hostile layouts beside a good one; links are relative, so copies keep them
    hub = root / "hub"
    shutil.copytree(root / "base", root / "outside")
    good = _hub_repo(hub, "good") / "snapshots" / COMMIT
    for f in (root / "base").iterdir():  # blobs and links, as huggingface_hub lays them out
        (good.parent.parent / "blobs" / f.name).write_bytes(f.read_bytes())
        good.mkdir(exist_ok=True)
        (good / f.name).symlink_to(f"../../blobs/{f.name}")
    _hub_repo(hub, "refs-up", "../../../outside")
    _hub_repo(hub, "refs-abs", str(root / "outside"))
    shutil.copytree(root / "base", _hub_repo(hub, "not-a-commit", "not-a-commit") / "snapshots" / "not-a-commit")
    (_hub_repo(hub, "snap-link") / "snapshots" / COMMIT).symlink_to("../../../outside")
    for repo, links in (
        ("file-link", {"config.json": "config.json", "model.safetensors": "model.safetensors"}),
        ("config-link", {"config.json": None}),
    ):
        snapshot = _hub_repo(hub, repo) / "snapshots" / COMMIT
        snapshot.mkdir()
        for name, target in links.items():
            (snapshot / name).symlink_to(f"../../../../outside/{target or name}")
        if repo == "config-link":
            shutil.copy(root / "base" / "model.safetensors", snapshot / "model.safetensors")
    storage = _hub_repo(hub, "blobs-link")
    (storage / "blobs").rmdir()
    (storage / "blobs").symlink_to("../../outside")
    (storage / "snapshots" / COMMIT).mkdir()
    (storage / "snapshots" / COMMIT / "model.safetensors").symlink_to("../../blobs/model.safetensors")
    snapshot = _hub_repo(hub, "shard-link") / "snapshots" / COMMIT
    snapshot.mkdir()
    (snapshot / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {n: "shard.safetensors" for n in tensor_names}})
    )
    (snapshot / "shard.safetensors").symlink_to("../../../../outside/model.safetensors")
    snapshot = _hub_repo(hub, "index-list") / "snapshots" / COMMIT
    snapshot.mkdir()
    (snapshot / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": ["x.safetensors"]}}))
    # a local checkpoint whose weight file is a link to another folder's
    (root / "linked").mkdir()
    (root / "linked" / "model.safetensors").symlink_to("../ft/model.safetensors")
    shutil.copy(root / "ft" / "config.json", root / "linked" / "config.json")

    # adapters holding what LoRA factors do not explain
    q = "base_model.model.layers.0.self_attn.q_proj"
    _with_tensors(
        adapters["llama"],
        root / "adapter_magnitude",
        lambda t: t.update({f"{q}.lora_magnitude_vector": torch.ones(32)}),
    )
    _with_tensors(
        adapters["llama"], root / "adapter_stray_bias", lambda t: t.update({f"{q}.lora_B.bias": torch.ones(32)})
    )
    _with_tensors(
        adapters["llama"],
        root / "adapter_stray_base_layer",
        lambda t: t.update({"base_model.model.layers.0.mlp.up_proj.base_layer.weight": torch.ones(64, 32)}),
    )
    _with_tensors(
        adapters["llama"],
        root / "adapter_unlisted",
        lambda t: t.update({"base_model.model.norm.weight": torch.ones(32)}),
    )
    _with_tensors(adapters["llama"], root / "adapter_save_string", lambda t: None, {"modules_to_save": "norm"})
    for name, seed, extra in (
        ("bert_adapter", 3, {}),
        ("bert_bias", 4, {"lora_bias": True, "modules_to_save": ["pooler.dense"]}),
        ("bert_bias2", 5, {"lora_bias": True, "modules_to_save": ["pooler.dense"]}),
    ):
        torch.manual_seed(seed)
        get_peft_model(
            synthetic.tiny_model("bert", seed=0),
            LoraConfig(r=2, lora_alpha=4, target_modules=["query"], init_lora_weights=False, **extra),
        ).save_pretrained(root / name)
    for name, seed in (("zero_ad", 6), ("zero_ad2", 7)):  # PEFT's default initialisation: B = 0
        torch.manual_seed(seed)
        get_peft_model(
            synthetic.tiny_model("llama", seed=0), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
        ).save_pretrained(root / name)

    # a fine-tune lacking one matrix, for compare
    (root / "ft_missing").mkdir()
    tensors = load_file(root / "ft2" / "model.safetensors")
    del tensors["layers.0.mlp.up_proj.weight"]
    save_file(tensors, root / "ft_missing" / "model.safetensors")
    shutil.copy(root / "ft2" / "config.json", root / "ft_missing" / "config.json")

    # weight_map values of every JSON type but a file name
    for label, value in (
        ("list", ["model-00001-of-00001.safetensors"]),
        ("object", {"f": 1}),
        ("null", None),
        ("true", True),
        ("empty", ""),
    ):
        _index_folder(root, f"evil_wm_{label}", {n: value for n in tensor_names})


def _billion_laughs(key: str, head: str) -> str:
    """A YAML recipe whose `key` is nine levels of nine aliases: 9⁹ values once expanded."""
    levels = ["l0: &l0 [1, 2, 3, 4, 5, 6, 7, 8, 9]"]
    levels += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 10)]
    return head + "\n".join(levels) + f"\n{key}: *l9\n"


def _newest_surfaces(root: Path) -> None:
    from peft import LoraConfig, get_peft_model

    (root / "bomb_mk.yml").write_text(
        _billion_laughs("  seed", "merge_method: linear\nmodels: [{model: ft}]\n").replace(
            "\n  seed:", "\nparameters:\n  seed:"
        )
    )
    (root / "bomb_seed.yml").write_text(_billion_laughs("seed", "method: task-arithmetic\nbase: base\nmodels: [ft]\n"))
    (root / "recursive.yml").write_text("method: task-arithmetic\nbase: base\nmodels: &m [ft, *m]\n")
    (root / "aliased_seed.yml").write_text(
        "method: dare-linear\nbase: base\nmodels: [ft]\ndensity: 0.5\n"
        "seed: [&l0 [1, 2, 3, 4, 5, 6, 7, 8, 9], *l0, *l0, *l0, *l0, *l0, *l0, *l0, *l0]\n"
    )
    shutil.copytree(root / "ft", root / "lying")
    config = json.loads((root / "lying" / "config.json").read_text())
    (root / "lying" / "config.json").write_text(json.dumps({**config, "vocab_size": 2**40}))
    words = synthetic.tiny_texts(1, seed=3, words=(60_000, 60_000))[0]  # ~300 KB on one line
    (root / "long_line.txt").write_text("\n".join([*synthetic.tiny_texts(3), words]) + "\n")
    (root / "many_lines.txt").write_text("w1\n" * 100_001)
    mk = {
        "mk_franken.yml": "merge_method: passthrough\nslices:\n  - sources: [{model: ft, layer_range: [0, 2]}]\n"
        "  - sources: [{model: ft2, layer_range: [1, 2]}]\n",
        "mk_range.yml": "merge_method: passthrough\nslices:\n  - sources: [{model: ft, layer_range: [1, 5]}]\n",
        "mk_modules.yml": "merge_method: linear\nmodules: {text: {models: [{model: ft}]}}\n",
        "mk_residual.yml": "merge_method: passthrough\nslices:\n"
        "  - sources: [{model: ft, layer_range: [0, 2]}]\n    residual_weight: 0.5\n",
        "mk_plus.yml": "merge_method: linear\nmodels: [{model: ft+adapter, parameters: {weight: 1}}]\n",
        "mk_template.yml": "merge_method: linear\nmodels: [{model: ft, parameters: {weight: 1}}]\n"
        "chat_template: chatml\n",
        "mk_shared.yml": "merge_method: slerp\nbase_model: ft\n"
        "models: [{model: ft}, {model: ft2, parameters: {t: 0.5}}]\n",
        "mk_circle.yml": "merge_method: linear\nmodels: [{model: x, parameters: {weight: 1}}]\n---\nname: x\n"
        "merge_method: linear\nmodels: [{model: y, parameters: {weight: 1}}]\n---\nname: y\n"
        "merge_method: linear\nmodels: [{model: x, parameters: {weight: 1}}]\n",
        "mk_vocab.yml": "merge_method: ties\nbase_model: base\nmodels: [{model: ft, parameters: {weight: 1}}]\n"
        "tokenizer_source: union\n",
        "mk_two.yml": "name: x\nmerge_method: linear\nmodels: [{model: ft, parameters: {weight: 1}}]\n---\n"
        "merge_method: linear\nmodels: [{model: x, parameters: {weight: 1}}]\n",
    }
    for name, text in mk.items():
        (root / name).write_text(text)
    synthetic.save(synthetic.tiny_model("bert", seed=4, hidden=48), root / "decoy")  # a working folder with
    synthetic.tiny_tokenizer(root / "decoy")  # another model's config.json and a tokenizer
    torch.manual_seed(8)
    get_peft_model(
        synthetic.tiny_model("bert", seed=0),
        LoraConfig(r=2, target_modules=["query"], modules_to_save=["pooler"], init_lora_weights=False),
    ).save_pretrained(root / "bert_pooler")


def _gguf_surfaces(root: Path) -> None:
    """GGUF files written by llama.cpp's gguf package, then damaged as an attacker would."""
    from conftest import patch_gguf_tensor, write_gguf

    rng = np.random.default_rng(0)
    tensors = {
        "token_embd.weight": rng.standard_normal((8, 64)).astype(np.float32),
        "blk.0.attn_q.weight": rng.standard_normal((64, 64)).astype(np.float32),
    }
    quant = {"blk.0.attn_q.weight": "Q8_0"}
    for name in ("q8", "cut", "lying", "unknown_type", "far", "nan_scale"):
        write_gguf(root / f"{name}.gguf", tensors, quant=quant)
    (root / "cut.gguf").write_bytes((root / "cut.gguf").read_bytes()[:-1000])
    patch_gguf_tensor(root / "lying.gguf", "blk.0.attn_q.weight", dims=[64, 6400])
    patch_gguf_tensor(root / "unknown_type.gguf", "blk.0.attn_q.weight", type_id=99)
    patch_gguf_tensor(root / "far.gguf", "blk.0.attn_q.weight", offset=1 << 40)
    data = bytearray((root / "nan_scale.gguf").read_bytes())
    start = len(data) - 64 * 34  # the Q8_0 tensor's blocks end the file: its first block's float16 scale
    data[start : start + 2] = b"\x00\x7e"  # a float16 NaN
    (root / "nan_scale.gguf").write_bytes(bytes(data))
    write_gguf(root / "mamba.gguf", tensors, arch="mamba")
    (root / "two_gguf").mkdir()
    shutil.copy(root / "q8.gguf", root / "two_gguf" / "a.gguf")
    shutil.copy(root / "q8.gguf", root / "two_gguf" / "b.gguf")
    shutil.copy(root / "q8.gguf", root / "weights.bin")


def _moe_surfaces(root: Path) -> None:
    """A tiny Qwen3-MoE saved by transformers, a copy with a hole in its experts, one whose
    experts differ in shape, a dense fine-tune of another width, and mergekit-moe recipes."""
    import yaml
    from test_experts import _moe

    _moe("qwen3_moe").save_pretrained(root / "moe")
    for damage in ("moe_hole", "moe_ragged"):
        shutil.copytree(root / "moe", root / damage)
        tensors = load_file(root / damage / "model.safetensors")
        if damage == "moe_hole":
            del tensors["model.layers.0.mlp.experts.2.up_proj.weight"]
        else:
            tensors["model.layers.1.mlp.experts.3.down_proj.weight"] = torch.zeros(32, 20)
        save_file(tensors, root / damage / "model.safetensors")
    fixtures = Path(__file__).resolve().parent / "fixtures" / "moe"
    recipe = yaml.safe_load((fixtures / "mixtral-hidden.yml").read_text())
    recipe["base_model"] = str(fixtures / "llama-base")
    for expert in recipe["experts"]:
        expert["source_model"] = str(fixtures / expert["source_model"])
    for name, change in {
        "moe_ok.yml": {},
        "moe_deepseek.yml": {"architecture": "deepseek"},
        "moe_typo.yml": {"experts_per_tokens": 2},
        "moe_inside.yml": {},
    }.items():
        (root / name).write_text(yaml.safe_dump({**recipe, **change}))
    (root / "moe_list.yml").write_text("- base_model: x\n")


def snapshot(root: Path) -> dict[str, str]:
    """Every file (links as their target) with a hash of its bytes."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = "link:" + os.readlink(path)
        elif path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_hostile_input(case, template, tmp_path, monkeypatch, capsys):
    work = tmp_path / "w"
    shutil.copytree(template, work, symlinks=True)
    if (work / "evil_link" / "escape.safetensors").is_symlink():  # keep it pointing outside its folder
        (work / "evil_link" / "escape.safetensors").unlink()
        (work / "evil_link" / "escape.safetensors").symlink_to(work / "base" / "model.safetensors")
    if (work / "link.json").is_symlink():
        (work / "link.json").unlink()
        (work / "link.json").symlink_to(work / "existing.json")
    monkeypatch.chdir(work)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(work / "hub"))
    before = snapshot(work)
    args = case.args.replace("{minilm}", str(minilm_path())).split(" ")
    code = exit_code(args)
    captured = capsys.readouterr()
    assert code == case.code, f"{case.args}\nstdout: {captured.out[-2000:]}\nstderr: {captured.err}"
    assert "Traceback" not in captured.err
    if case.code == 2:
        lines = [line for line in captured.err.splitlines() if line.strip()]
        assert len(lines) == 1, captured.err  # one line
        assert lines[0].startswith("error:") and case.message in lines[0], captured.err
        assert ".partial" not in lines[0], "the message names a staging folder, not the user's path"
    else:
        assert case.message in captured.out + captured.err, captured
    for rel in case.exists:
        assert (work / rel).exists(), rel
    for rel in case.absent:
        assert not (work / rel).exists(), rel
    after = snapshot(work)
    for rel, digest in before.items():
        if rel not in case.replaces:
            assert after.get(rel) == digest, f"{rel} changed or vanished"
    leftovers = [p for p in after if ".partial" in p or ".replaced" in p]
    assert not leftovers, leftovers
    if case.code == 2:
        assert set(after) == set(before), "a refused command wrote something"


@dataclass(frozen=True)
class ApiCase:
    """A careless or hostile call of the Python API: refused with one line, the workspace and every
    module handed in unchanged."""

    id: str
    call: Callable[[Path, dict[str, torch.nn.Module]], object]  # (workspace, the modules handed in)
    message: str
    cwd: str = "."


def _loaded(work: Path, *names: str) -> dict[str, torch.nn.Module]:
    from transformers import AutoModel

    return {name: AutoModel.from_pretrained(work / name) for name in names}


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


API_CASES = [
    # 1. a model in memory has no folder: never the working folder's config.json or tokenizer
    ApiCase(
        "regmean-in-memory-no-tokenizer",
        lambda w, m: wl.merge(None, [m["ft"], m["ft2"]], method="regmean", calibration=str(w / "calib.txt")),
        "a model in memory carries none",
        cwd="decoy",
    ),
    ApiCase(
        "regmean-state-dicts-have-no-config",
        lambda w, m: wl.merge(
            None,
            [_state(m["ft"]), _state(m["ft2"])],
            method="regmean",
            calibration=str(w / "calib.txt"),
            tokenizer=str(w / "tok"),
        ),
        "no .config",
        cwd="decoy",
    ),
    # 2. into= all or nothing
    ApiCase(
        "into-another-width",
        lambda w, m: wl.merge(str(w / "base"), [str(w / "ft")], method="task-arithmetic", into=m["wide"]),
        "the module's is",
    ),
    ApiCase(
        "into-a-bert",
        lambda w, m: wl.merge(str(w / "base"), [str(w / "ft")], method="task-arithmetic", into=m["bert"]),
        "tensors the module lacks",
    ),
    # 3. the boundary: wrong types are one line
    ApiCase("into-a-string", lambda w, m: wl.merge(str(w / "base"), [str(w / "ft")], method="ties", into="m"), "into="),
    ApiCase(
        "into-with-as-adapter",
        lambda w, m: wl.merge(
            str(w / "base"), [str(w / "adapter")], method="task-arithmetic", into=m["ft"], as_adapter=True
        ),
        "into= loads a merged model",
    ),
    ApiCase(
        "weights-words",
        lambda w, m: wl.merge(
            str(w / "base"), [str(w / "ft"), str(w / "ft2")], method="task-arithmetic", weights=["half", "half"]
        ),
        "weights= must be a list of numbers",
    ),
    ApiCase(
        "calibration-a-number",
        lambda w, m: wl.merge(None, [str(w / "ft"), str(w / "ft2")], method="regmean", calibration=123),
        "calibration= must be",
    ),
    ApiCase(
        "longdouble-weights",
        lambda w, m: wl.inspect({"w": np.ones((4, 4), dtype=np.longdouble)}),
        "has no torch dtype",
    ),
    ApiCase(
        "complex-weights",
        lambda w, m: wl.merge(
            {"w": torch.zeros(4, 4, dtype=torch.complex64)},
            [{"w": torch.ones(4, 4, dtype=torch.complex64)}],
            method="task-arithmetic",
        ),
        "is complex",
    ),
    ApiCase(
        "options-wrong-type",
        lambda w, m: wl.spectrum(str(w / "base"), str(w / "ft"), values_only="yes"),
        "true or false",
    ),
]


@pytest.mark.parametrize("case", API_CASES, ids=lambda c: c.id)
def test_hostile_api_call(case, template, tmp_path, monkeypatch):
    work = tmp_path / "w"
    shutil.copytree(template, work, symlinks=True)
    modules = {**_loaded(work, "ft", "ft2", "bert")}
    modules["wide"] = synthetic.tiny_model("llama", seed=0, hidden=48)
    handed = {
        name: {k: (v.data_ptr(), v.detach().clone()) for k, v in m.state_dict().items()} for name, m in modules.items()
    }
    monkeypatch.chdir(work / case.cwd)
    before = snapshot(work)
    with pytest.raises(wl.WeightlabError) as caught:
        case.call(work, modules)
    message = str(caught.value)
    assert case.message in message and "\n" not in message and ".partial" not in message, message
    assert snapshot(work) == before, "a refused call wrote or changed a file"
    for name, module in modules.items():  # every module handed in: bit-identical, in place
        for key, tensor in module.state_dict().items():
            ptr, values = handed[name][key]
            assert tensor.data_ptr() == ptr and torch.equal(tensor, values), f"{name}: {key}"


def test_the_corpus_covers_every_command_and_class():
    commands = {c.args.split()[0] for c in CASES}
    assert commands >= {
        "inspect",
        "spectrum",
        "angles",
        "gaussian",
        "tsd",
        "merge",
        "init-lora",
        "extract-lora",
        "report",
        "demo",
        "compare",
        "esd",
        "quant-error",
        "experts",
        "slim-experts",
        "build-moe",
    }
    assert len(CASES) >= 180
