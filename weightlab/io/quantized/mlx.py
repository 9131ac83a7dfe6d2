"""MLX's affine quantization (mlx-lm's `convert -q`): config.json's `quantization` gives
`group_size` and `bits` (and per-module overrides), and per linear layer `weight` uint32 [O, I·b/32]
holds the values packed densely along each row (value i at bit i·b), `scales` and `biases`
[O, I/group_size]: W = scales·q + biases per group, in the scales' dtype as `mx.dequantize`
computes it.
"""

from __future__ import annotations

from typing import Any

import torch

from weightlab.io.quantized.packing import unpack_unsigned
from weightlab.io.quantized.scheme import Group, Scheme, register


@register("mlx")
class MLX(Scheme):
    def groups(self) -> list[Group]:
        mode = self.settings.get("mode", "affine")
        if mode != "affine":
            raise self.refuse(f"mode {mode!r} is not read (affine is)")
        out = []
        for name in self.ckpt.names():
            if not name.endswith(".scales"):
                continue
            prefix = name.removesuffix(".scales")
            parts = {"weight": prefix + ".weight", "scales": name, "biases": prefix + ".biases"}
            missing = [p for p in parts.values() if p not in self.ckpt]
            if missing:
                raise self.refuse(f"has scales but no {missing[0]}", name)
            size, bits = self._settings(prefix)
            rows, words = self.shape_of(parts["weight"])
            cols = words * 32 // bits
            if self.ckpt.info(parts["weight"]).dtype != "U32" or self.shape_of(name) != (rows, cols // size):
                raise self.refuse(
                    f"{bits}-bit groups of {size} do not fit weight {[rows, words]} "
                    f"and scales {list(self.shape_of(name))}",
                    name,
                )
            if self.shape_of(parts["biases"]) != self.shape_of(name):
                raise self.refuse(
                    f"biases are {list(self.shape_of(parts['biases']))}, scales {list(self.shape_of(name))}", name
                )
            dtype = {"F16": torch.float16, "BF16": torch.bfloat16}.get(self.ckpt.info(name).dtype, torch.float32)
            settings = {"bits": bits, "size": size, "cols": cols}
            out.append(Group(prefix + ".weight", parts, (rows, cols), dtype, f"MLX int{bits} g{size}", settings))
        return out

    def _settings(self, prefix: str) -> tuple[int, int]:
        own: Any = self.settings.get(prefix, self.settings)
        own = own if isinstance(own, dict) else self.settings
        size, bits = own.get("group_size"), own.get("bits")
        if not (isinstance(size, int) and size > 0 and isinstance(bits, int) and 1 <= bits <= 8):
            raise self.refuse(f"group_size {size!r} and bits {bits!r} for {prefix}")
        return size, bits

    def decode(self, parts: dict[str, torch.Tensor], group: Group) -> torch.Tensor:
        s = group.settings
        q = unpack_unsigned(parts["weight"], s["bits"], s["cols"])
        scales = parts["scales"].repeat_interleave(s["size"], dim=1)
        biases = parts["biases"].repeat_interleave(s["size"], dim=1)
        return scales * q.to(scales.dtype) + biases  # in the scales' dtype, as mx.dequantize
