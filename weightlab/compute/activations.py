"""Running the real model on calibration text: input Gram matrices of its linear layers (RegMean)
and diagonal Fisher information (Fisher merging).

The model is built by transformers from the checkpoint's config (the config.json beside its
weights, or a module's own `.config`; its own class, no remote code), checked against the weights
on the meta device before anything is allocated, and given the checkpoint's weights through
weightlab's safe reader, never transformers' loader. Gram matrices X_ᵀX are accumulated in
float64 over the non-padding tokens, in groups whose matrices fit `GRAM_BUDGET` bytes (a group per
pass over the texts), and each group is written to disk before the next begins, so memory holds
one group whatever the model's depth.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from weightlab.errors import InvalidArgument, ShapeMismatch, shown
from weightlab.io.checkpoint import Checkpoint
from weightlab.io.experts import ModuleNames
from weightlab.io.safetensors_file import write_safetensors
from weightlab.naming import layer_index

GRAM_BUDGET = 1 << 30  # bytes of float64 Gram matrices held at once
MAX_TOKENS = 128  # tokens per calibration text
BATCH = 16  # texts per forward pass
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model", "vocab.json")

Step = Callable[[int], None]


def find_tokenizer(candidates: list[Checkpoint], given: str | None) -> str:
    """The tokenizer folder: `given`, else the first input folder on disk that holds tokenizer files
    (a model in memory has none)."""
    if given is not None:
        if not any((Path(given) / f).is_file() for f in TOKENIZER_FILES):
            raise InvalidArgument("--tokenizer: no tokenizer files in this folder", given)
        return given
    for ckpt in candidates:
        folder = ckpt.folder
        if folder is not None and any((folder / f).is_file() for f in TOKENIZER_FILES):
            return str(folder)
    in_memory = any(c.folder is None for c in candidates)
    raise InvalidArgument(
        "no tokenizer among the inputs (no tokenizer.json or vocab file beside the config"
        + ("; a model in memory carries none" if in_memory else "")
        + "): give --tokenizer FOLDER",
        str(candidates[0].path),
    )


def config_source(ckpt: Checkpoint) -> str:
    """Where a checkpoint's config comes from, for messages: its config.json, or the module's `.config`."""
    return str(ckpt.folder / "config.json") if ckpt.folder is not None else f"{ckpt.path}: its .config"


def transformers_config(ckpt: Checkpoint) -> Any:
    """The transformers config of a checkpoint: from the config.json beside its weights, or from
    the `.config` of the module it was read from; never a file the caller did not give."""
    import transformers

    raw = ckpt.config.raw if ckpt.config is not None else None
    if not raw:
        what = (
            "no config.json beside its weights"
            if ckpt.folder is not None
            else "no .config (a transformers module has one; a state dict has none)"
        )
        raise InvalidArgument(
            f"data-aware merging runs the model, and this input has {what} to build it from", ckpt.path
        )
    where = config_source(ckpt)
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or model_type not in transformers.CONFIG_MAPPING:
        raise InvalidArgument(f"model_type {shown(model_type)} is not an architecture transformers knows", where)
    try:
        return transformers.CONFIG_MAPPING[model_type].from_dict(dict(raw))
    except Exception as e:  # whatever a config class raises on values it cannot take
        raise InvalidArgument(f"transformers cannot read this config ({_first_line(e)})", where) from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def load_tokenizer(folder: str) -> Any:
    """A tokenizer from its folder (transformers', local files only, no remote code), with a pad
    token (its EOS or UNK where it has none); one line naming the folder when it cannot be loaded."""
    import transformers

    try:
        tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except (ValueError, KeyError, OSError) as e:
        raise InvalidArgument(f"transformers cannot load this tokenizer ({_first_line(e)})", folder) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def module_shapes(module: Any) -> dict[str, tuple[int, ...]]:
    """Each tensor of a module's state dict: its shape (what `ModuleNames` provides)."""
    return {key: tuple(t.shape) for key, t in module.state_dict().items()}


def build_network(config: Any, ckpt: Checkpoint, dtype: torch.dtype = torch.float32) -> tuple[Any, dict[str, str]]:
    """The network `config` describes (its architecture's transformers class, no remote code),
    with the checkpoint's names for its tensors (read them through `ModuleNames`: a module's fused
    experts are assembled from a checkpoint's per-expert tensors); built on the meta device first, so that a config
    that disagrees with the weights (a parameter the checkpoint lacks, another shape) or would take
    more memory than they do (buffers beyond the checkpoint's size) is refused before anything is
    allocated."""
    import transformers

    where = config_source(ckpt)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls_ = getattr(transformers, arch, None) if isinstance(arch, str) else None

    def build() -> Any:
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # parameters made in `dtype`; buffers a model computes in float32 stay so
        try:
            return cls_(config) if cls_ is not None else transformers.AutoModel.from_config(config)  # type: ignore[no-untyped-call]
        finally:
            torch.set_default_dtype(default)

    try:
        with torch.device("meta"):
            skeleton = build()
    except Exception as e:  # any failure to build is the config's
        raise InvalidArgument(
            f"transformers cannot build the network this config describes ({_first_line(e)})", where
        ) from None
    ckpt = ModuleNames(ckpt, module_shapes(skeleton))
    names = _match_names(skeleton, ckpt, where)
    for key, tensor in skeleton.state_dict().items():
        if key in names and tuple(tensor.shape) != tuple(ckpt.info(names[key]).shape):
            raise ShapeMismatch(
                f"the config gives {key} the shape {list(tensor.shape)}, the weights "
                f"{list(ckpt.info(names[key]).shape)}: this config is not the weights' model",
                where,
                names[key],
            )
    refuse_oversized(skeleton, names, ckpt, where)
    try:
        return build(), names
    except Exception as e:
        raise InvalidArgument(
            f"transformers cannot build the network this config describes ({_first_line(e)})", where
        ) from None


def refuse_oversized(skeleton: Any, names: dict[str, str], ckpt: Checkpoint, where: str) -> None:
    """Refuse a network (built on the meta device) whose buffers the checkpoint does not hold
    would take more memory than the weights themselves (at least 1 MiB is allowed)."""
    weights = sum(ckpt.info(n).nbytes for n in ckpt.names())
    extra = sum(b.numel() * b.element_size() for key, b in skeleton.named_buffers() if key not in names)
    if extra > max(weights, 1 << 20):
        raise InvalidArgument(
            f"the network this config describes holds {extra / 2**20:.0f} MiB of buffers beyond its weights "
            f"({weights / 2**20:.0f} MiB): refused before allocating it",
            where,
        )


@dataclass
class Runner:
    """One model of the inputs' architecture, built once; each input's weights loaded in turn."""

    model: Any
    tokenizer: Any
    device: torch.device
    names: dict[str, str]  # the module's state-dict key -> the checkpoint's tensor name
    order: list[str]  # checkpoint names in the module's order
    targets: dict[str, tuple[Any, bool]] = field(default_factory=dict)  # weight name -> (module, transposed)
    max_tokens: int = MAX_TOKENS  # of each text: MAX_TOKENS, or fewer where the model or tokenizer takes fewer

    def named(self, ckpt: Checkpoint) -> Checkpoint:
        """`ckpt` read under the names `load` asks for (`ModuleNames`: fused experts assembled)."""
        return ModuleNames(ckpt, module_shapes(self.model))

    @classmethod
    def build(
        cls, ckpt: Checkpoint, tokenizer: str, device: torch.device, dtype: torch.dtype = torch.float32
    ) -> Runner:
        """The network `ckpt`'s config describes, with `ckpt`'s tensor names (`build_network`), its
        parameters in `dtype` (float32 for the statistics; build-moe runs bfloat16, as mergekit)."""
        model, names = build_network(transformers_config(ckpt), ckpt, dtype)
        model.eval().to(device)
        tok = load_tokenizer(tokenizer)
        runner = cls(model, tok, device, names, [names[k] for k in model.state_dict() if k in names])
        limits = [getattr(model.config, k, None) for k in ("max_position_embeddings", "n_positions")]
        limits.append(getattr(tok, "model_max_length", None))
        runner.max_tokens = min([MAX_TOKENS, *(n for n in limits if isinstance(n, int) and n > 0)])
        for module_name, module in model.named_modules():
            key = f"{module_name}.weight"
            if key in names and _is_linear(module):
                runner.targets[names[key]] = (module, type(module).__name__ == "Conv1D")
        if not runner.targets:
            raise InvalidArgument("this model has no linear layer whose weights the checkpoint holds", ckpt.path)
        return runner

    def load(self, tensors: Callable[[str], torch.Tensor]) -> None:
        """Every weight of the module from `tensors(checkpoint name)`, one tensor at a time (cast
        to the module's dtype as it is copied in)."""
        state = self.model.state_dict()  # views of the module's own tensors
        with torch.no_grad():
            for key, name in self.names.items():
                tensor = tensors(name)
                if tensor.shape != state[key].shape:  # copy_ would broadcast
                    raise ShapeMismatch(
                        f"{list(tensor.shape)} where the network has {list(state[key].shape)}", None, name
                    )
                state[key].copy_(tensor)

    def batches(self, texts: tuple[str, ...], size: int = BATCH) -> Iterator[dict[str, torch.Tensor]]:
        for start in range(0, len(texts), size):
            encoded = self.tokenizer(
                [kept_prefix(self.tokenizer, t, self.max_tokens) for t in texts[start : start + size]],
                padding=True,
                truncation=True,
                max_length=self.max_tokens,
                return_tensors="pt",
            )
            yield {k: v.to(self.device) for k, v in encoded.items()}

    def grams(self, texts: tuple[str, ...], targets: list[str], step: Step | None = None) -> dict[str, torch.Tensor]:
        """X_ᵀX (float64) of the inputs each target's layer sees over the texts' real tokens; the
        forward pass stops once every target has run."""
        out: dict[str, torch.Tensor] = {}
        mask: list[torch.Tensor] = []
        fired: set[str] = set()

        class _Done(Exception):
            pass

        def hook(name: str) -> Callable[..., None]:
            def record(module: Any, inputs: tuple[torch.Tensor, ...], output: Any) -> None:
                x = inputs[0].detach()
                if x.ndim >= 3 and tuple(x.shape[:2]) == tuple(mask[0].shape):
                    x = x[mask[0].bool()]
                x = x.reshape(-1, x.shape[-1]).double()
                gram = x.mT @ x
                out[name] = out[name] + gram if name in out else gram
                fired.add(name)
                if len(fired) == len(targets):
                    raise _Done

            return record

        handles = [self.targets[n][0].register_forward_hook(hook(n)) for n in targets]
        try:
            with torch.no_grad():
                for batch in self.batches(texts):
                    mask[:] = [batch["attention_mask"]]
                    fired.clear()
                    try:
                        self.model(**batch)
                    except _Done:
                        pass
                    if step:
                        step(1)
        finally:
            for h in handles:
                h.remove()
        missing = [n for n in targets if n not in out]
        if missing:
            raise InvalidArgument(
                f"the forward pass never reached {missing[0]}: cannot compute its inputs' Gram matrix"
            )
        return out

    def fisher(self, texts: tuple[str, ...], seed: int, step: Step | None = None) -> dict[str, torch.Tensor]:
        """Diagonal Fisher information of the model's own predictive distribution, E_x E_y~p(·|x)
        [(∇ log p(y|x))²], one text at a time (Matena & Raffel 2022, eq. 4): labels drawn from the
        softmax of the logits (a language model), or, for an encoder without a head, the Gaussian
        N(f(x), I) on its last hidden states (Fisher JᵀJ)."""
        params = {key: p for key, p in self.model.named_parameters() if key in self.names}
        total = {key: torch.zeros_like(p, dtype=torch.float64) for key, p in params.items()}
        generator = torch.Generator().manual_seed(seed)
        wanted = {id(p) for p in params.values()}
        for p in self.model.parameters():
            p.requires_grad_(id(p) in wanted)
        for batch in self.batches(texts, size=1):
            self.model.zero_grad(set_to_none=True)
            output = self.model(**batch)
            logits = getattr(output, "logits", None)
            if logits is not None:
                draws = torch.multinomial(
                    torch.softmax(logits.detach().float().reshape(-1, logits.shape[-1]), -1).cpu(),
                    1,
                    generator=generator,
                )
                loss = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), draws.reshape(-1).to(logits.device), reduction="sum"
                )
            else:
                hidden = output[0]
                noise = torch.randn(hidden.shape, generator=generator, dtype=hidden.dtype).to(hidden.device)
                loss = (hidden * noise).sum()
            loss.backward()  # type: ignore[no-untyped-call]
            for key, p in params.items():
                if p.grad is not None:
                    total[key] += p.grad.detach().double() ** 2
            if step:
                step(1)
        self.model.zero_grad(set_to_none=True)
        return {self.names[key]: t / len(texts) for key, t in total.items()}


_LAST_SPACE = re.compile(r"\s(?=\S*$)")


def kept_prefix(tokenizer: Any, text: str, max_tokens: int = MAX_TOKENS) -> str:
    """The start of `text` that holds all the tokenizer keeps of it (its first `max_tokens` tokens),
    found by characters before the whole is tokenized: a prefix cut at a space (whole words, so the
    tokens before the cut are the text's own) that yields more than `max_tokens` tokens, trying
    16 characters a token, then four times as many each time. A 50 MB line costs no more than its
    kept prefix (at most 4× too long)."""
    chars = max_tokens * 16
    while len(text) > chars:
        cut = text[:chars]
        space = _LAST_SPACE.search(cut)
        if space is not None and space.start() > 0:
            cut = cut[: space.start()]
        counted = tokenizer(cut, add_special_tokens=False, truncation=True, max_length=max_tokens + 1)
        if len(counted["input_ids"]) > max_tokens:
            return cut
        chars *= 4
    return text


def _is_linear(module: Any) -> bool:
    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"


def _match_names(model: Any, ckpt: Checkpoint, where: str) -> dict[str, str]:
    """The module's state-dict keys -> the checkpoint's names (the same, or with the base-model
    prefix added or dropped); a parameter the checkpoint lacks, unless tied to one it has, is an error."""
    names = set(ckpt.names())
    prefix = getattr(model, "base_model_prefix", "") or ""
    out: dict[str, str] = {}
    for key in model.state_dict():
        for candidate in (key, f"{prefix}.{key}", key.removeprefix(f"{prefix}.")):
            if candidate in names:
                out[key] = candidate
                break
    loaded = {id(p) for key, p in model.named_parameters(remove_duplicate=False) if key in out}
    for key, p in model.named_parameters(remove_duplicate=False):
        if key not in out and id(p) not in loaded:  # neither held nor tied to a tensor held
            raise InvalidArgument(
                f"the model {type(model).__name__} this config describes has {key}, which the weights "
                f"({ckpt.path}) lack: it cannot be run",
                where,
                key,
            )
    return out


class StatisticsStore:
    """Per-model statistics of tensors, on disk in `folder` (a file per model and group), read
    back one tensor at a time."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.where: dict[tuple[int, str], Path] = {}
        self.transposed: dict[str, bool] = {}

    def put(self, model: int, group: int, tensors: Mapping[str, torch.Tensor]) -> None:
        path = self.folder / f"m{model}-g{group}.safetensors"
        write_safetensors(path, {n: t.cpu().contiguous() for n, t in tensors.items()})
        for name in tensors:
            self.where[(model, name)] = path

    def of(self, name: str, models: int) -> list[torch.Tensor] | None:
        if (0, name) not in self.where:
            return None
        out = []
        for i in range(models):
            with safe_open(str(self.where[(i, name)]), framework="pt") as f:
                out.append(f.get_tensor(name))
        return out


def gram_groups(runner: Runner, by_layer: bool) -> list[list[str]]:
    """The targets in the module's order, grouped so that each group's Gram matrices fit
    GRAM_BUDGET (by_layer: a group per layer, then one for linears outside the layers)."""
    groups: list[list[str]] = []
    current: list[str] = []
    used = 0
    ordered = [n for n in runner.order if n in runner.targets]
    if by_layer:
        layers: dict[int | None, list[str]] = {}
        for name in ordered:
            layers.setdefault(layer_index(name), []).append(name)
        return [v for k, v in sorted(layers.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))]
    for name in ordered:
        module, transposed = runner.targets[name]
        width = module.weight.shape[0] if transposed else module.weight.shape[1]
        size = width * width * 8
        if current and used + size > GRAM_BUDGET:
            groups.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    return groups + ([current] if current else [])
