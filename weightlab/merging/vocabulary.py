"""One vocabulary for models whose tokenizers differ (mergekit's `tokenizer_source` and `tokenizer:`).

Fine-tunes that added tokens (a chat template's several) have larger embedding and head matrices
than their base. Before merging, every model's vocabulary rows are mapped onto the output
vocabulary (the base's, the union of all, or one model's, with any tokens a recipe adds): a
token a model has keeps its row; one it lacks gets a default row, the same for every model (the
one model that has it gives its row, else the base's row if the base has it, else the mean over
the models that have it, else zero), unless the recipe says where its row comes from. The output
carries that tokenizer and its vocabulary size (padded to `pad_to_multiple_of` with the mean row,
as mergekit pads). The rules are mergekit 0.1.5's (`tokenizer/build.py`, `tokenizer/embed.py`).
"""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from weightlab.errors import InvalidArgument
from weightlab.io.checkpoint import Checkpoint
from weightlab.io.safetensors_file import TensorInfo
from weightlab.naming import module_role

SOURCES = ("base", "union")  # or a model's path
TEXT_FILES = (".json", ".txt", ".jinja", ".model")


@dataclass(frozen=True)
class TokenRow:
    """Where one output token's row comes from: a model (its row for that token, or for another
    `token` / `token_id` of its own vocabulary), or zeros (`model` None); `force` uses it even
    for the models that have the token."""

    model: str | None
    token: str | None = None
    token_id: int | None = None
    force: bool = False


@dataclass(frozen=True)
class Vocabulary:
    """The output vocabulary: `source` ("base", "union" or a model), tokens added or placed, padding."""

    source: str
    tokens: dict[str, TokenRow] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"source": self.source}
        if self.tokens:
            out["tokens"] = {
                token: {k: v for k, v in vars(row).items() if v not in (None, False)}
                for token, row in self.tokens.items()
            }
        if self.pad_to_multiple_of:
            out["pad_to_multiple_of"] = self.pad_to_multiple_of
        return out


def load_tokenizer(folder: Path | None, label: str) -> Any:
    """The tokenizer in a model's folder (a fast tokenizer, no remote code)."""
    import transformers

    if folder is None:
        raise InvalidArgument("this needs the model's tokenizer files, and a model in memory has none", label)
    try:
        return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise InvalidArgument(
            f"transformers cannot load its tokenizer ({str(e).splitlines()[0][:160]})", label
        ) from None


def vocab_size(ckpt: Checkpoint, tokenizer: Any) -> int:
    """The rows of a model's embedding: its config's vocab_size, else its tokenizer's length."""
    size = ckpt.config.raw.get("vocab_size") if ckpt.config is not None else None
    return size if isinstance(size, int) and size > 0 else len(tokenizer.get_vocab())


class AlignedVocabulary:
    """The output tokenizer and each model's rows mapped onto it (`aligned`)."""

    def __init__(self, spec: Vocabulary, models: dict[str, Checkpoint], base: str | None):
        self.spec, self.models = spec, models
        self.base = base  # whose row a token several models have takes (none: their mean)
        self.anchor = base if base is not None else next(iter(models))  # whose tokenizer is the start
        self.tokenizers = {name: load_tokenizer(ckpt.folder, name) for name, ckpt in models.items()}
        self.sizes = {name: vocab_size(models[name], tok) for name, tok in self.tokenizers.items()}
        for name, tok in self.tokenizers.items():
            beyond = [t for t, i in tok.get_vocab().items() if i >= self.sizes[name]]
            if beyond and name == self.anchor:
                raise InvalidArgument(
                    f"its tokenizer holds {len(beyond)} tokens beyond its vocab_size ({self.sizes[name]}), "
                    f"e.g. {beyond[0]!r}: trim the tokenizer first",
                    name,
                )
        self.tokenizer = self._output_tokenizer()
        self.vocab = self.tokenizer.get_vocab()
        self.rows = len(self.vocab)
        pad = spec.pad_to_multiple_of
        if pad and self.rows % pad:
            self.rows += pad - self.rows % pad
        self.maps = {name: self._map(name) for name in models}
        self._cache: dict[str, dict[str, torch.Tensor]] = {}

    def _output_tokenizer(self) -> Any:
        source = self.spec.source
        if source == "union":
            out = self._union()
        else:
            out = _fresh_copy(self.tokenizers[self.anchor if source == "base" else source])
        existing = set(out.get_vocab())
        for token in self.spec.tokens:
            if token not in existing:
                out.add_tokens(token)
                existing.add(token)
        return out

    def _union(self) -> Any:
        """The base's tokenizer with every other model's tokens added (its added tokens with their settings)."""
        out = _fresh_copy(self.tokenizers[self.anchor])
        base_vocab = self.tokenizers[self.anchor].get_vocab()
        plain: dict[str, None] = {}
        added: dict[str, Any] = {}
        for name, tok in self.tokenizers.items():
            decoder = tok.added_tokens_decoder
            added_here = {info.content for info in decoder.values()}
            for token, index in tok.get_vocab().items():
                if index < self.sizes[name] and token not in added_here:
                    plain.setdefault(token)
            for index, info in decoder.items():
                if index < self.sizes[name]:
                    added.setdefault(info.content, info)
        for token in plain:
            if token not in added and token not in base_vocab:
                out.add_tokens(token)
        for info in added.values():
            out.add_tokens(info)
        return out

    def _map(self, name: str) -> list[int]:
        """For each output token id, the model's row (−1: the model lacks it)."""
        own = self.tokenizers[name].get_vocab()
        out = [-1] * len(self.vocab)
        for token, index in self.vocab.items():
            found = own.get(token, -1)
            out[index] = found if found < self.sizes[name] else -1
        return out

    def has_rows(self, ckpt_name: str, tensor: str, shape: tuple[int, ...]) -> bool:
        """Whether a tensor's first axis is the model's vocabulary (an embedding or a head)."""
        return module_role(tensor) in ("embed", "head") and len(shape) >= 1 and shape[0] == self.sizes[ckpt_name]

    def aligned(self, tensor: str, model: str) -> torch.Tensor:
        """`model`'s rows of `tensor` on the output vocabulary (computed for every model at once)."""
        if tensor not in self._cache:
            rows = {name: ckpt.get(tensor, dtype=torch.float32) for name, ckpt in self.models.items()}
            self._cache[tensor] = self._align(rows)
        found = self._cache[tensor].pop(model)
        if not self._cache[tensor]:
            del self._cache[tensor]
        return found

    def _align(self, rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        names = list(rows)
        width = next(iter(rows.values())).shape[1:]
        sources = self._row_sources(names)
        defaults: dict[str, torch.Tensor] = {}
        for token, index in self.vocab.items():
            row = self.spec.tokens.get(token)
            if not (row is not None and row.force) and all(self.maps[n][index] >= 0 for n in names):
                continue
            how = sources.get(token)
            if how is None:  # present in several models: their mean
                having = [rows[n][self.maps[n][index]] for n in names if self.maps[n][index] >= 0]
                defaults[token] = torch.stack(having).mean(0)
            else:
                defaults[token] = self._row(how, token, index, rows, width)
        out = {}
        for n in names:
            new = torch.zeros((self.rows, *width), dtype=torch.float32)
            for token, index in self.vocab.items():
                row = self.spec.tokens.get(token)
                if self.maps[n][index] >= 0 and not (row is not None and row.force):
                    new[index] = rows[n][self.maps[n][index]]
                elif token in defaults:
                    new[index] = defaults[token]
            if self.rows > len(self.vocab):
                new[len(self.vocab) :] = new[: len(self.vocab)].mean(0)
            out[n] = new
        return out

    def _row_sources(self, names: list[str]) -> dict[str, TokenRow]:
        """Each token some model lacks: the row it takes (the recipe's, the one model's that has it,
        the base's, zeros); absent where the models that have it are averaged."""
        sources = dict(self.spec.tokens)
        for token, index in self.vocab.items():
            if token in sources:
                continue
            having = [n for n in names if self.maps[n][index] >= 0]
            if len(having) == 1:
                sources[token] = TokenRow(having[0])
            elif not having:
                sources[token] = TokenRow(None)
            elif self.base is not None and self.base in names and self.maps[self.base][index] >= 0:
                sources[token] = TokenRow(self.base)
        return sources

    def _row(
        self, how: TokenRow, token: str, index: int, rows: dict[str, torch.Tensor], width: torch.Size
    ) -> torch.Tensor:
        if how.model is None:
            return torch.zeros(width)
        if how.model not in rows:
            raise InvalidArgument(f"the row of token {token!r} comes from a model that is not merged", how.model)
        if how.token_id is not None or how.token is not None:
            own = self.tokenizers[how.model].get_vocab()
            at = how.token_id if how.token_id is not None else own.get(how.token or "", -1)
            if at is None or not 0 <= at < rows[how.model].shape[0]:
                raise InvalidArgument(f"token {how.token or how.token_id!r} is not in its vocabulary", how.model)
            return rows[how.model][at]
        at = self.maps[how.model][index]
        if at < 0:
            raise InvalidArgument(f"token {token!r} is not in its vocabulary", how.model)
        return rows[how.model][at]

    def tokenizer_files(self, chat_template: str | None) -> dict[str, str]:
        """The output tokenizer's files (as `save_pretrained` writes them), with `chat_template`."""
        return saved_tokenizer(self.tokenizer, chat_template, list(self.tokenizers.values()))


def _fresh_copy(tokenizer: Any) -> Any:
    """A tokenizer saved and loaded again (adding tokens to it leaves the model's own unchanged)."""
    import transformers

    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)


def chosen_template(chat_template: str, tokenizers: list[Any]) -> str | None:
    """A recipe's `chat_template`: "auto" (the template most of the models' tokenizers carry, None
    when none does) or the template's own Jinja text."""
    if chat_template == "auto":
        found = [t.chat_template.strip() for t in tokenizers if isinstance(getattr(t, "chat_template", None), str)]
        return Counter(found).most_common(1)[0][0] if found else None
    return chat_template


def saved_tokenizer(tokenizer: Any, chat_template: str | None, others: list[Any]) -> dict[str, str]:
    """The text files `save_pretrained` writes for `tokenizer` (with its chat template set)."""
    template = chosen_template(chat_template, [tokenizer, *others]) if chat_template else None
    with tempfile.TemporaryDirectory() as folder:
        copy = _fresh_copy(tokenizer)
        if template is not None:
            copy.chat_template = template
        copy.save_pretrained(folder)
        return {p.name: p.read_text() for p in sorted(Path(folder).iterdir()) if p.suffix in TEXT_FILES and p.is_file()}


class VocabularyView(Checkpoint):
    """A model with its vocabulary rows on the output vocabulary (`AlignedVocabulary.aligned`)."""

    def __init__(self, ckpt: Checkpoint, name: str, vocabulary: AlignedVocabulary):
        super().__init__(ckpt.path, ckpt.config)
        self.ckpt, self.name, self.vocabulary = ckpt, name, vocabulary
        self.read_ahead = ckpt.read_ahead
        self.aligned_names = {
            n for n in ckpt.names() if vocabulary.has_rows(name, n, tuple(ckpt.info(n).shape)) and ckpt.info(n).is_float
        }
        self.__infos = {
            n: replace(ckpt.info(n), shape=(vocabulary.rows, *ckpt.info(n).shape[1:])) if n in self.aligned_names
            else ckpt.info(n)
            for n in ckpt.names()
        }  # fmt: skip

    @property
    def folder(self) -> Path | None:
        return self.ckpt.folder

    @property
    def _infos(self) -> dict[str, TensorInfo]:
        return self.__infos

    def formed_whole(self, name: str) -> bool:
        return name in self.aligned_names or self.ckpt.formed_whole(name)

    def get(
        self, name: str, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        if name not in self.aligned_names:
            return self.ckpt.get(name, device, dtype)
        self.bytes_read += self.info(name).nbytes
        tensor = self.vocabulary.aligned(name, self.name)
        return tensor.to(device or "cpu", dtype if dtype is not None else torch.float32)

    def get_rows(
        self,
        name: str,
        start: int,
        stop: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        into: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if name in self.aligned_names:
            return self.get(name, device, dtype)[start:stop]
        return self.ckpt.get_rows(name, start, stop, device, dtype, into)


def with_vocabulary(config_raw: dict[str, Any], rows: int) -> dict[str, Any]:
    """A config.json's contents with its vocabulary size set to `rows`."""
    return {**config_raw, "vocab_size": rows}
