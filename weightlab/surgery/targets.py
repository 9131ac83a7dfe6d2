"""Choose the modules a LoRA adapts, with PEFT's conventions for `target_modules`."""

from __future__ import annotations

import re

from weightlab.errors import InvalidArgument
from weightlab.io.checkpoint import Checkpoint
from weightlab.naming import expert_site, is_conv1d, module_role

_REGEX_CHARS = set("*+?[](){}|\\^$")
_NOT_LINEAR = {"embed", "pos_embed", "head", "norm", "bias"}


def linear_weights(ckpt: Checkpoint) -> list[str]:
    """2-D floating `*.weight` tensors that are linear layers (not embeddings, norms or the head,
    nor a Mixture-of-Experts' routed experts and routers: `in_moe_layer`)."""
    out = []
    for name in ckpt.names():
        info = ckpt.info(name)
        if name.endswith(".weight") and len(info.shape) == 2 and info.is_float and module_role(name) not in _NOT_LINEAR:
            if not in_moe_layer(name):
                out.append(name)
    return out


def in_moe_layer(name: str) -> bool:
    """A routed expert's matrix or a router: transformers holds an MoE layer's experts as fused
    parameters and its router as its own module, so no PEFT LoRA targets them as linear modules
    (PEFT's `all-linear` leaves them out too)."""
    return expert_site(name) is not None or module_role(name) == "router"


def resolve_targets(ckpt: Checkpoint, targets: str) -> list[str]:
    """Weight names of the targeted modules.

    `all-linear`: every linear layer but the output head (as PEFT); a string with regex characters:
    modules whose full name matches it (`re.fullmatch`, as PEFT does for a string); otherwise
    comma-separated module-name suffixes such as `q_proj,v_proj`, each of which must match.
    """
    if targets == "all-linear":
        chosen = linear_weights(ckpt)
    else:
        modules = {
            n.removesuffix(".weight"): n
            for n in ckpt.names()
            if n.endswith(".weight") and len(ckpt.info(n).shape) == 2 and ckpt.info(n).is_float
        }
        if _REGEX_CHARS & set(targets):
            try:
                pattern = re.compile(targets)
            except re.error as e:
                raise InvalidArgument(f"--targets {targets!r} is not a valid regular expression ({e})") from None
            chosen = [n for m, n in modules.items() if pattern.fullmatch(m)]
        else:
            chosen = []
            for suffix in [t.strip() for t in targets.split(",") if t.strip()]:
                hits = [n for m, n in modules.items() if m == suffix or m.endswith("." + suffix)]
                if not hits:
                    raise InvalidArgument(f"--targets entry {suffix!r} matches no 2-D weight", ckpt.path)
                chosen.extend(hits)
    moe = [n for n in chosen if in_moe_layer(n)]
    if moe:
        raise InvalidArgument(
            f"--targets {targets!r} matches {len(moe)} Mixture-of-Experts expert or router weights "
            f"({moe[0]}, …): transformers holds experts fused and routers as their own modules, which a PEFT "
            "LoRA cannot target as linear modules; target the attention or dense layers",
            ckpt.path,
        )
    if not chosen:
        raise InvalidArgument(f"--targets {targets!r} matches no 2-D weight", ckpt.path)
    return sorted(set(chosen), key=ckpt.names().index)


def fan_in_fan_out(base: Checkpoint, targets: list[str]) -> bool:
    """PEFT's `fan_in_fan_out` for an adapter of `targets`: true for GPT-2's Conv1D (in×out) weights."""
    conv = {is_conv1d(n, base.config) for n in targets}
    if len(conv) > 1:
        raise InvalidArgument("targets mix Conv1D (in×out) and Linear weights; target them in separate adapters")
    return conv.pop() if conv else False
