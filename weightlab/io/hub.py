"""Hugging Face Hub model IDs wherever a checkpoint path is accepted.

`org/name` or `org/name@revision` (a branch, tag or commit) resolves through `huggingface_hub`;
`org/name[@revision]:FILE` names one GGUF file of a repository that holds several, by its name
(`model.Q4_K_M.gguf`) or its quantization (`Q4_K_M`, any case, as llama.cpp's `-hf` takes it):
its cache, a download with progress when online, `HF_HUB_OFFLINE=1` honoured. Only what weightlab
reads is fetched: the configs and indexes first, then exactly the weight files they name. A local
path that exists always wins over an ID.

The cache is a folder anyone with write access could have edited, so what it resolves to is
confined: a revision must lead to `snapshots/<commit hash>` of that very repository (a ref must
hold a commit hash, `cached_snapshot`), and every file of the snapshot must resolve, links
followed, inside the repository's `blobs/` or that snapshot (`confine_snapshot`). Nothing
outside the repository's cache folder is ever opened.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from weightlab.errors import CheckpointNotFound, CorruptCheckpoint
from weightlab.io.files import NotARegularFile, read_regular
from weightlab.io.index import read_weight_map

HUB_ID = re.compile(
    r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?(?::(?P<file>[\w.+-]+))?$"
)
METADATA = ["config.json", "adapter_config.json", "generation_config.json", "*.safetensors.index.json"]
DENSE_INDEX = "model.safetensors.index.json"
COMMIT = re.compile(r"[0-9a-f]{40}")


def parse_hub_id(text: str) -> tuple[str, str | None] | None:
    """(repo, revision) for text shaped like `org/name[@revision][:FILE]`, else None."""
    match = HUB_ID.match(text)
    if not match or (match["revision"] and any(p in ("", ".", "..") for p in match["revision"].split("/"))):
        return None  # a revision is a name, never a path out of the cache
    if match["file"] is not None and match["file"] in (".", ".."):
        return None
    return match["repo"], match["revision"]


def hub_file(text: str) -> str | None:
    """The `:FILE` of a Hub ID (a GGUF file's name or quantization), None when it names none."""
    match = HUB_ID.match(text)
    return match["file"] if match and parse_hub_id(text) else None


def is_hub_id(source: str | Path) -> bool:
    """True when `source` is not an existing local path but reads as a Hub model ID."""
    return not Path(source).exists() and parse_hub_id(str(source)) is not None


def require_input(source: str | Path) -> None:
    """Refuse at once a path that does not exist and is no Hub ID either (nothing is read)."""
    if not Path(source).exists() and parse_hub_id(str(source)) is None:
        raise CheckpointNotFound("no such file or folder", source)


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
    wanted = hub_file(str(source))
    if wanted is not None:
        return _gguf_in_snapshot(str(source), *hub, wanted)
    return _snapshot(str(source), *hub)


def gguf_patterns(wanted: str) -> list[str]:
    """What to fetch for `:FILE`: that file, or every GGUF file whose name holds the quantization."""
    if wanted.endswith(".gguf"):
        return [wanted, f"*/{wanted}"]
    return sorted({f"*{w}*.gguf" for w in (wanted, wanted.lower(), wanted.upper())})


def _gguf_in_snapshot(source: str, repo: str, revision: str | None, wanted: str) -> Path:
    """The one GGUF file of the snapshot that `:FILE` names (the first shard of a split model)."""
    cached = cached_snapshot(repo, revision, source)
    found = _matching_gguf(cached, wanted) if cached is not None else []
    if len(found) != 1:
        folder = _fetch(source, repo, revision, gguf_patterns(wanted))
        found = _matching_gguf(folder, wanted)
    if not found:
        raise CheckpointNotFound(f"the Hub model {repo} has no GGUF file matching {wanted!r}", source)
    if len(found) > 1:
        names = ", ".join(p.name for p in found[:4]) + (", …" if len(found) > 4 else "")
        raise CheckpointNotFound(f"{wanted!r} matches {len(found)} GGUF files of {repo} ({names}): name one", source)
    return found[0]


def _matching_gguf(folder: Path, wanted: str) -> list[Path]:
    files = [p for p in sorted(folder.rglob("*.gguf")) if not re.search(r"-(?!00001)\d{5}-of-\d{5}\.gguf$", p.name)]
    if wanted.endswith(".gguf"):
        return [p for p in files if p.name == wanted]
    return [p for p in files if wanted.lower() in p.name.lower()]


def _weight_files(folder: Path) -> list[str]:
    """The weight files a snapshot's metadata asks for: an index's shards, else the single file."""
    index = folder / DENSE_INDEX
    if index.is_file():
        return sorted(set(read_weight_map(index).values()))
    if (folder / "adapter_config.json").is_file():
        return ["adapter_model.safetensors"]
    return ["model.safetensors"]


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def confine_snapshot(repo: str, folder: Path, source: str) -> Path:
    """`folder` when it is `snapshots/<commit hash>` of `repo`'s cache folder (links resolved) and
    every entry in it resolves inside that repository's `blobs/` or the snapshot itself; else
    `CorruptCheckpoint` naming the entry. A `refs/` file holding a path, a snapshot that links
    out of the cache, or a weight file linking elsewhere are refused before anything is read."""
    root, real = _real(cache_folder(repo)), _real(folder)
    if not COMMIT.fullmatch(folder.name) or real != root / "snapshots" / folder.name:
        really = f" (links followed: {real})" if real != Path(os.path.abspath(folder)) else ""
        raise CorruptCheckpoint(
            f"the Hub cache of {repo} resolves this revision to {folder}{really}, which is not a "
            "commit snapshot inside that repository's cache folder",
            source,
        )
    allowed = (root / "blobs", root / "snapshots" / folder.name)
    for parent, folders, files in os.walk(folder):  # links to folders are listed, not followed
        for name in folders + files:
            entry = Path(parent) / name
            real = _real(entry)
            if not any(real == home or home in real.parents for home in allowed):
                raise CorruptCheckpoint(
                    f"this file of the Hub cache of {repo} leads outside the repository "
                    f"(to {real}); the cache may have been tampered with",
                    entry,
                )
    return folder


def _inside(path: Path, root: Path) -> bool:
    real = _real(path)
    return real == root or root in real.parents


def _ref(storage: Path, name: str, repo: str, source: str) -> str | None:
    """The commit hash `refs/NAME` holds in the cache (None when there is no such ref)."""
    ref = storage / "refs" / name
    if not os.path.lexists(ref):
        return None
    tampered = f"the Hub cache of {repo} has a refs/{name} that "
    if not _inside(ref.parent, _real(storage) / "refs"):
        raise CorruptCheckpoint(tampered + "lies outside the repository; the cache may have been tampered with", source)
    try:
        text = read_regular(ref, 256).decode("ascii")
    except (NotARegularFile, UnicodeDecodeError):
        raise CorruptCheckpoint(tampered + "is not a file holding a commit hash", source) from None
    if not COMMIT.fullmatch(text):
        raise CorruptCheckpoint(
            tampered + f"holds {text[:80]!r}, not a commit hash; the cache may have been tampered with", source
        )
    return text


def cached_snapshot(repo: str, revision: str | None, source: str) -> Path | None:
    """The confined snapshot the cache holds for `revision`, or None when it holds none (then
    huggingface_hub fetches it). The cache is read here, not by huggingface_hub, whose offline
    lookup joins a ref's content into the paths it opens before anything could check it."""
    storage = cache_folder(repo)
    commit = revision if revision and COMMIT.fullmatch(revision) else _ref(storage, revision or "main", repo, source)
    if commit is None:
        return None
    listing = storage / "trees" / f"{commit}.json"  # huggingface_hub reads it when it fetches
    if os.path.lexists(listing) and not _inside(listing, _real(storage)):
        raise CorruptCheckpoint(
            f"this file of the Hub cache of {repo} leads outside the repository (to "
            f"{_real(listing)}); the cache may have been tampered with",
            listing,
        )
    folder = storage / "snapshots" / commit
    return confine_snapshot(repo, folder, source) if os.path.lexists(folder) else None


def _snapshot(source: str, repo: str, revision: str | None) -> Path:
    cached = cached_snapshot(repo, revision, source)
    if cached is not None and all((cached / w).is_file() for w in _weight_files(cached)):
        return cached
    folder = _fetch(source, repo, revision, METADATA)
    weights = _weight_files(folder)
    folder = _fetch(source, repo, revision, weights)
    missing = [w for w in weights if not (folder / w).is_file()]
    if missing:
        raise CheckpointNotFound(
            f"the Hub model {repo} has no {missing[0]} (for one of its GGUF files, name it: "
            f"{repo}:Q4_K_M or {repo}:FILE.gguf)",
            source,
        )
    return folder


def _fetch(source: str, repo: str, revision: str | None, patterns: list[str]) -> Path:
    """The confined snapshot of `repo` at `revision` with the files `patterns` match fetched."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return confine_snapshot(repo, Path(snapshot_download(repo, revision=revision, allow_patterns=patterns)), source)
    except RevisionNotFoundError:
        raise CheckpointNotFound(
            f"no such file or folder, and the Hub model {repo} has no revision {revision}", source
        ) from None
    except (RepositoryNotFoundError, GatedRepoError):
        raise CheckpointNotFound(
            f"no such file or folder, and no Hub model {repo} this account can read", source
        ) from None
    except IncompleteSnapshotError:
        raise CheckpointNotFound(
            f"no such file or folder, and the Hub model {repo} is only partly in the cache "
            "(offline: HF_HUB_OFFLINE or no network)",
            source,
        ) from None
    except LocalEntryNotFoundError:
        raise CheckpointNotFound(
            f"no such file or folder, and the Hub model {repo} is not in the cache "
            "(offline: HF_HUB_OFFLINE or no network)",
            source,
        ) from None
    except (HfHubHTTPError, HFValidationError, OSError) as error:
        raise CheckpointNotFound(
            f"no such file or folder, and the Hub model {repo} could not be fetched: {str(error).splitlines()[0]}",
            source,
        ) from None
