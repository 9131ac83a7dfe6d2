"""AWQ (Lin et al. 2024, "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration"), AutoAWQ's GEMM layout, as transformers loads it.

Per linear layer with I inputs and O outputs at 4 bits: `qweight` int32 [I, O/8], `qzeros` int32
[G, O/8], `scales` float16 [G, O], G = I / group_size. Eight outputs share a word in AWQ's order
(0, 2, 4, 6, 1, 3, 5, 7): value k of word j holds output 8j + ORDER[k]. No offset on the zeros:
W[o, i] = (q[i, o] − z[i // group_size, o])·s[i // group_size, o], in float16 as AutoAWQ's
`dequantize_gemm` computes it. The GEMV layout ("version": "gemv") is refused by name.
"""

from __future__ import annotations

import torch

from weightlab.io.quantized.packing import unpack
from weightlab.io.quantized.scheme import Group, Scheme, register

PARTS = {"qweight": ".qweight", "qzeros": ".qzeros", "scales": ".scales"}
REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]  # where each output sits among a word's eight values


@register("awq")
class AWQ(Scheme):
    def groups(self) -> list[Group]:
        bits, size = (
            self.settings.get("bits", self.settings.get("w_bit")),
            self.settings.get("group_size", self.settings.get("q_group_size")),
        )
        version = str(self.settings.get("version", "gemm")).lower()
        if version != "gemm":
            raise self.refuse(f"the {version} layout is not read (the GEMM layout is)")
        if bits != 4 or not isinstance(size, int) or size < 1:
            raise self.refuse(f"bits {bits!r} and group_size {size!r}: 4 bits in groups are read")
        out = []
        for name in self.ckpt.names():
            if not name.endswith(".qweight"):
                continue
            prefix = name.removesuffix(".qweight")
            parts = self.stored(prefix, PARTS)
            missing = [r for r in PARTS if r not in parts]
            if missing:
                raise self.refuse(f"has no {prefix}.{missing[0]}", name)
            inputs, words = self.shape_of(name)
            outputs, groups = words * 8, -(-inputs // size)
            expected = {"qzeros": (groups, words), "scales": (groups, outputs)}
            for role, shape in expected.items():
                if self.shape_of(parts[role]) != shape:
                    raise self.refuse(f"{role} are {list(self.shape_of(parts[role]))}, not {list(shape)}", parts[role])
            out.append(
                Group(prefix + ".weight", parts, (outputs, inputs), torch.float16, f"AWQ int4 g{size}", {"size": size})
            )
        return out

    def decode(self, parts: dict[str, torch.Tensor], group: Group) -> torch.Tensor:
        def values(words: torch.Tensor) -> torch.Tensor:
            v = unpack(words, 4, 1)
            return v.reshape(v.shape[0], -1, 8)[:, :, REVERSE_ORDER].reshape(v.shape)

        size = group.settings["size"]
        q, zeros = values(parts["qweight"]), values(parts["qzeros"])
        scales = parts["scales"].to(torch.float16).repeat_interleave(size, dim=0)[: q.shape[0]]
        zeros = zeros.repeat_interleave(size, dim=0)[: q.shape[0]]
        return ((q - zeros).to(torch.float16) * scales).t()
