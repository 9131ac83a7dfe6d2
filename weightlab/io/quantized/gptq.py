"""GPTQ (Frantar et al. 2023, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"), as AutoGPTQ, GPTQModel and transformers store it.

Per linear layer with I inputs and O outputs, for 2, 4 or 8 bits: `qweight` int32 [I·b/32, O]
(input rows packed into words, lowest bits first), `qzeros` int32 [G, O·b/32] (packed along
outputs), `scales` float16 [G, O], `g_idx` int32 [I] (each input's group: i // group_size, or any
order with act-order, `desc_act`). The stored zero is z − 1 in the original format
(`checkpoint_format` "gptq"; "gptq_v2" stores z), so W[o, i] = s[g_i, o]·(q[i, o] − ((z'[g_i, o] + 1)
mod 2^b)), in float16 as AutoGPTQ's dequantizer computes it.
"""

from __future__ import annotations

import torch

from weightlab.io.quantized.packing import unpack
from weightlab.io.quantized.scheme import Group, Scheme, register

PARTS = {"qweight": ".qweight", "qzeros": ".qzeros", "scales": ".scales", "g_idx": ".g_idx"}


@register("gptq")
class GPTQ(Scheme):
    def groups(self) -> list[Group]:
        bits = self.settings.get("bits")
        if bits not in (2, 4, 8):
            raise self.refuse(f"{bits}-bit GPTQ is not read (2, 4 and 8 bits are)")
        v2 = str(self.settings.get("checkpoint_format", "gptq")).lower() == "gptq_v2"
        out = []
        for name in self.ckpt.names():
            if not name.endswith(".qweight"):
                continue
            prefix = name.removesuffix(".qweight")
            parts = self.stored(prefix, PARTS)
            missing = [r for r in ("qzeros", "scales") if r not in parts]
            if missing:
                raise self.refuse(f"has no {prefix}.{missing[0]}", name)
            words, outputs = self.shape_of(name)
            inputs = words * 32 // bits
            groups = self.shape_of(parts["scales"])[0]
            if self.shape_of(parts["scales"]) != (groups, outputs):
                raise self.refuse(f"scales are {list(self.shape_of(parts['scales']))}, not [groups, {outputs}]", name)
            if self.shape_of(parts["qzeros"]) != (groups, outputs * bits // 32):
                raise self.refuse(
                    f"qzeros are {list(self.shape_of(parts['qzeros']))}, not [{groups}, {outputs * bits // 32}]", name
                )
            if "g_idx" in parts and self.shape_of(parts["g_idx"]) != (inputs,):
                raise self.refuse(
                    f"g_idx has {list(self.shape_of(parts['g_idx']))} entries for {inputs} input columns",
                    parts["g_idx"],
                )
            group_size = self.settings.get("group_size", -1)
            expected = 1 if group_size in (-1, None) else -(-inputs // group_size)
            if "g_idx" not in parts and groups != expected:
                raise self.refuse(f"{groups} groups do not fit {inputs} inputs in groups of {group_size}", name)
            label = f"GPTQ int{bits}" + (f" g{group_size}" if group_size not in (-1, None) else "")
            settings = {"bits": bits, "v2": v2, "group_size": group_size}
            out.append(Group(prefix + ".weight", parts, (outputs, inputs), torch.float16, label, settings))
        return out

    def decode(self, parts: dict[str, torch.Tensor], group: Group) -> torch.Tensor:
        bits, inputs = group.settings["bits"], group.shape[1]
        q = unpack(parts["qweight"], bits, 0)  # [I, O]
        zeros = unpack(parts["qzeros"], bits, 1)  # [G, O]
        if not group.settings["v2"]:
            zeros = (zeros + 1) & ((1 << bits) - 1)
        groups = zeros.shape[0]
        if "g_idx" in parts:
            g = parts["g_idx"].to(torch.int64)
            if bool((g < 0).any()) or bool((g >= groups).any()):
                raise self.refuse(f"g_idx names groups outside 0..{groups - 1}", group.name)
        else:
            size = group.settings["group_size"]
            g = torch.arange(inputs) // (inputs if size in (-1, None) else size)
        scales = parts["scales"].to(torch.float16)
        w = scales[g] * (q - zeros[g]).to(torch.float16)  # [I, O], float16 as AutoGPTQ computes it
        return w.t()
