"""compressed-tensors (vLLM's llm-compressor): `pack-quantized`, `float-quantized`,
`int-quantized` and `naive-quantized` checkpoints.

Per linear layer: the integer values q (signed, b bits) either packed densely into int32 words
along each row (`weight_packed`, value i at bit i·b, stored as q + 2^(b−1); `weight_shape` the
unpacked shape) or stored as int8 or float8 `weight`; `weight_scale` per tensor [1], per output
channel [O, 1] or per group [O, I/g]; for asymmetric schemes `weight_zero_point`, packed the same
way down the columns when the weight is. W = (q − zero)·scale in the scale's dtype, as
`compressed_tensors.quantization.lifecycle.forward._dequantize` computes it.
"""

from __future__ import annotations

import torch

from weightlab.io.quantized.packing import unpack_unsigned
from weightlab.io.quantized.scheme import Group, Scheme, register

PARTS = {
    "packed": ".weight_packed",
    "weight": ".weight",
    "scale": ".weight_scale",
    "zero_point": ".weight_zero_point",
    "shape": ".weight_shape",
}
FORMATS = ("pack-quantized", "float-quantized", "int-quantized", "naive-quantized")


@register("compressed-tensors")
class CompressedTensors(Scheme):
    def groups(self) -> list[Group]:
        form = self.settings.get("format")
        if form not in FORMATS:
            raise self.refuse(f"format {form!r} is not read ({', '.join(FORMATS)} are)")
        bits = self._weight_bits()
        out = []
        for name in self.ckpt.names():
            if not name.endswith(".weight_scale"):
                continue
            prefix = name.removesuffix(".weight_scale")
            parts = self.stored(prefix, PARTS)
            if "packed" in parts:
                if "shape" not in parts:
                    raise self.refuse(f"has no {prefix}.weight_shape", parts["packed"])
                shape = tuple(int(x) for x in self.ckpt.get(parts["shape"]).tolist())
                rows, words = self.shape_of(parts["packed"])
                if len(shape) != 2 or shape[0] != rows or -(-shape[1] * bits // 32) != words:
                    raise self.refuse(
                        f"weight_shape {list(shape)} does not fit {rows}×{words} packed words", parts["packed"]
                    )
                label = f"{form} int{bits}"
            elif "weight" in parts:
                shape = self.shape_of(parts["weight"])
                label = f"{form} {self.ckpt.info(parts['weight']).dtype}"
            else:
                raise self.refuse(f"has a weight_scale but no weight for {prefix}", name)
            scale = self.shape_of(name)
            if len(shape) != 2 or not _fits(scale, shape):
                raise self.refuse(f"weight_scale {list(scale)} fits no strategy for a {list(shape)} weight", name)
            dtype = getattr(torch, {"F16": "float16", "BF16": "bfloat16"}.get(self.ckpt.info(name).dtype, "float32"))
            label += "" if scale[-1] == 1 else f" g{shape[1] // scale[-1]}"
            settings = {"bits": bits, "shape": shape}
            out.append(
                Group(
                    prefix + ".weight", {k: v for k, v in parts.items() if k != "shape"}, shape, dtype, label, settings
                )
            )
        return out

    def _weight_bits(self) -> int:
        """The weights' bit width, one for every config group (mixed widths are refused by name)."""
        groups = self.settings.get("config_groups") or {}
        bits = {
            g.get("weights", {}).get("num_bits")
            for g in groups.values()
            if isinstance(g, dict) and isinstance(g.get("weights"), dict)
        }
        if len(bits) != 1 or not all(isinstance(b, int) and 1 <= b <= 8 for b in bits):
            raise self.refuse(f"config_groups give weight bit widths {sorted(map(str, bits))}: one from 1 to 8 is read")
        return int(next(iter(bits)))

    def decode(self, parts: dict[str, torch.Tensor], group: Group) -> torch.Tensor:
        bits, (_, cols) = group.settings["bits"], group.settings["shape"]
        scale = parts["scale"]
        if "packed" in parts:
            q = unpack_dense(parts["packed"], bits, cols)
        else:
            q = parts["weight"]
        zero = parts.get("zero_point")
        if zero is not None and zero.dtype == torch.int32 and "packed" in parts:
            zero = unpack_dense(zero.t().contiguous(), bits, scale.shape[0]).t()
        grouped = scale.dim() == 2 and scale.shape[-1] > 1
        per = cols // scale.shape[-1] if grouped else 1

        def expand(x: torch.Tensor) -> torch.Tensor:
            """Per-group values to one per column (channel and tensor scales broadcast as they are)."""
            return x.repeat_interleave(per, dim=-1)[..., :cols] if grouped else x

        value = q.to(scale.dtype)
        if zero is not None:
            value = value - expand(zero.to(scale.dtype))
        return value * expand(scale)


def _fits(scale: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    rows, cols = shape
    return scale in ((1,), (rows, 1)) or (
        len(scale) == 2 and scale[0] == rows and scale[1] >= 1 and -(-cols // scale[1]) * scale[1] >= cols
    )


def unpack_dense(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Signed b-bit values packed densely along each row (stored offset by 2^(b−1)), as int32."""
    return unpack_unsigned(words, bits, count) - (1 << (bits - 1))
