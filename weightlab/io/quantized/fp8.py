"""FP8 weights (e4m3) with their scales: DeepSeek-V3's and Qwen3's block format (transformers'
`quant_method: fp8`, `weight_block_size` [bh, bw]: `weight_scale_inv` float32 [⌈O/bh⌉, ⌈I/bw⌉],
W = w·scale_inv[o // bh, i // bw]), and per-tensor or per-channel `weight_scale` ([] or [1], or
[O, 1]: W = w·scale; FBGEMM's `fbgemm_fp8` is per channel). Computed in float32, as
compressed-tensors' `FP8BlockDequantizer` does before its cast.
"""

from __future__ import annotations

import torch

from weightlab.io.quantized.scheme import Group, Scheme, register

PARTS = {"weight": ".weight", "scale_inv": ".weight_scale_inv", "scale": ".weight_scale"}


@register("fp8")
class FP8(Scheme):
    def groups(self) -> list[Group]:
        block = self.settings.get("weight_block_size")
        out = []
        for name in self.ckpt.names():
            if not name.endswith((".weight_scale_inv", ".weight_scale")):
                continue
            prefix = name.rsplit(".", 1)[0]
            weight = prefix + ".weight"
            if weight not in self.ckpt or not self.ckpt.info(weight).dtype.startswith("F8_"):
                raise self.refuse(f"has {name.rsplit('.', 1)[1]} but no float8 {weight}", name)
            rows, cols = self.shape_of(weight)
            scale = self.shape_of(name)
            if name.endswith("_inv"):
                if not (
                    isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)
                ):
                    raise self.refuse(f"weight_block_size {block!r} is not two block sides", name)
                if scale != (-(-rows // block[0]), -(-cols // block[1])):
                    raise self.refuse(
                        f"scales {list(scale)} do not tile {rows}×{cols} in {block[0]}×{block[1]} blocks", name
                    )
                label, settings = f"FP8 {block[0]}×{block[1]} blocks", {"block": tuple(block)}
            else:
                if scale not in ((), (1,), (rows, 1)):
                    raise self.refuse(f"weight_scale {list(scale)} is neither per tensor nor per channel", name)
                label, settings = "FP8 per " + ("channel" if scale == (rows, 1) else "tensor"), {}
            role = "scale_inv" if name.endswith("_inv") else "scale"
            out.append(Group(weight, {"weight": weight, role: name}, (rows, cols), torch.float32, label, settings))
        return out

    def decode(self, parts: dict[str, torch.Tensor], group: Group) -> torch.Tensor:
        w = parts["weight"].float()
        if "scale" in parts:
            scale = parts["scale"].float()
            return w * (scale.reshape(-1, 1) if scale.dim() == 2 else scale.reshape(()))
        bh, bw = group.settings["block"]
        rows, cols = w.shape
        scale = parts["scale_inv"].float().repeat_interleave(bh, 0).repeat_interleave(bw, 1)
        return w * scale[:rows, :cols]


@register("fbgemm_fp8")
class FBGEMMFP8(FP8):
    pass
