"""Hugging Face Hub model IDs wherever a checkpoint path is accepted.

`org/name` or `org/name@revision` (a branch, tag or commit) resolves through `huggingface_hub`:
its cache, a download with progress when online, `HF_HUB_OFFLINE=1` honoured. Only what weightlab
reads is fetched: the configs and indexes first, then exactly the weight files they name. A local
path that exists always wins over an ID.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from weightlab.errors import CheckpointNotFound

HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?$")
METADATA = ["config.json", "adapter_config.json", "generation_config.json", "*.safetensors.index.json"]
DENSE_INDEX = "model.safetensors.index.json"


def parse_hub_id(text: str) -> tuple[str, str | None] | None:
    """(repo, revision) for text shaped like `org/name[@revision]`, else None."""
    match = HUB_ID.match(text)
    if not match or (match["revision"] and any(p in ("", ".", "..") for p in match["revision"].split("/"))):
        return None  # a revision is a name, never a path out of the cache
    return match["repo"], match["revision"]


def is_hub_id(source: str | Path) -> bool:
    """True when `source` is not an existing local path but reads as a Hub model ID."""
    return not Path(source).exists() and parse_hub_id(str(source)) is not None


def cache_folder(repo: str) -> Path:
    """Where the Hub cache keeps `repo` (nothing is read or downloaded)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / ("models--" + repo.replace("/", "--"))


def locate(source: str | Path) -> Path:
    """The local path of a checkpoint: `source` itself when it exists, else the Hub snapshot of the
    model ID it names (downloaded if need be). Anything else is `CheckpointNotFound`."""
    path = Path(source)
    if path.exists():
        return path
    hub = parse_hub_id(str(source))
    if hub is None:
        raise CheckpointNotFound("no such file or folder", path)
    return _snapshot(str(source), *hub)


def _weight_files(folder: Path) -> list[str]:
    """The weight files a snapshot's metadata asks for: an index's shards, else the single file."""
    index = folder / DENSE_INDEX
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise CheckpointNotFound("its index has no readable weight_map", index) from None
        if any(Path(s).is_absolute() or ".." in Path(s).parts for s in shards):
            raise CheckpointNotFound("its index names a shard outside the repository", index)
        return shards
    if (folder / "adapter_config.json").is_file():
        return ["adapter_model.safetensors"]
    return ["model.safetensors"]


def _snapshot(source: str, repo: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HFValidationError, HfHubHTTPError, IncompleteSnapshotError,
                                        LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)

    try:
        folder = Path(snapshot_download(repo, revision=revision, allow_patterns=METADATA))
        weights = _weight_files(folder)
        folder = Path(snapshot_download(repo, revision=revision, allow_patterns=weights))
    except RevisionNotFoundError:
        raise CheckpointNotFound(f"no such file or folder, and the Hub model {repo} has no revision {revision}",
                                 source) from None
    except (RepositoryNotFoundError, GatedRepoError):
        raise CheckpointNotFound(f"no such file or folder, and no Hub model {repo} this account can read", source) from None
    except IncompleteSnapshotError:
        raise CheckpointNotFound(f"no such file or folder, and the Hub model {repo} is only partly in the cache "
                                 "(offline: HF_HUB_OFFLINE or no network)", source) from None
    except LocalEntryNotFoundError:
        raise CheckpointNotFound(f"no such file or folder, and the Hub model {repo} is not in the cache "
                                 "(offline: HF_HUB_OFFLINE or no network)", source) from None
    except (HfHubHTTPError, HFValidationError, OSError) as error:
        raise CheckpointNotFound(f"no such file or folder, and the Hub model {repo} could not be fetched: "
                                 f"{str(error).splitlines()[0]}", source) from None
    missing = [w for w in weights if not (folder / w).is_file()]
    if missing:
        raise CheckpointNotFound(f"the Hub model {repo} has no {missing[0]} (weightlab reads safetensors)", source)
    return folder
