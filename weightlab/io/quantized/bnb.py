"""bitsandbytes (Dettmers et al. 2023, "QLoRA", §3: 4-bit NormalFloat and double quantization;
Dettmers et al. 2022, "LLM.int8()"), as transformers saves `load_in_4bit`/`load_in_8bit` models.

4-bit (NF4 or FP4): `weight` uint8 [n/2, 1], two codes per byte, the first in the high nibble;
`weight.quant_map` (the 16 values a code stands for), `weight.absmax` per block of `blocksize`
values, and `weight.quant_state.bitsandbytes__nf4` (JSON: shape, dtype, blocksize). With double
quantization the absmax are themselves uint8 codes of `nested_quant_map` scaled per block of
`nested_blocksize` by `nested_absmax`, plus `nested_offset`. W = quant_map[code]·absmax[block],
in float32, then the original dtype, as `bitsandbytes.functional.dequantize_4bit` computes it.

8-bit: `weight` int8 [O, I] and `SCB` float32 [O]: W = q·SCB[o]·(1/127) (`int8_vectorwise_dequant`).
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch

from weightlab.io.quantized.scheme import Group, Scheme, register

STATE = ".weight.quant_state.bitsandbytes__"
PARTS_4BIT = {
    "weight": ".weight",
    "absmax": ".weight.absmax",
    "quant_map": ".weight.quant_map",
    "nested_absmax": ".weight.nested_absmax",
    "nested_quant_map": ".weight.nested_quant_map",
}
INVERSE_127 = 7.874015718698502e-3  # bitsandbytes multiplies by this float32 rather than divide by 127
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@register("bitsandbytes")
class BitsAndBytes(Scheme):
    def groups(self) -> list[Group]:
        out = []
        for name in self.ckpt.names():
            for kind in ("nf4", "fp4"):
                if name.endswith(STATE + kind):
                    out.append(self._four_bit(name, kind))
            if name.endswith(".SCB"):
                out.append(self._eight_bit(name))
        return out

    def _four_bit(self, state_name: str, kind: str) -> Group:
        prefix = state_name.removesuffix(STATE + kind)
        state = self._state(state_name)
        parts = {**self.stored(prefix, PARTS_4BIT), "state": state_name}
        for role in ("weight", "absmax", "quant_map"):
            if role not in parts:
                raise self.refuse(f"has no {prefix}{PARTS_4BIT[role]}", state_name)
        shape = tuple(state.get("shape", ()))
        blocksize = state.get("blocksize")
        numel = math.prod(shape) if shape and all(isinstance(d, int) and d > 0 for d in shape) else -1
        if numel < 1 or not isinstance(blocksize, int) or blocksize < 1:
            raise self.refuse(f"its quant state says shape {list(shape)} and blocksize {blocksize!r}", state_name)
        if math.prod(self.shape_of(parts["weight"])) != (numel + 1) // 2:
            raise self.refuse(
                f"{numel} values do not fit {list(self.shape_of(parts['weight']))} packed bytes", state_name
            )
        if self.shape_of(parts["absmax"]) != (-(-numel // blocksize),):
            raise self.refuse(
                f"absmax has {list(self.shape_of(parts['absmax']))} entries for {-(-numel // blocksize)} blocks",
                state_name,
            )
        nested = "nested_absmax" in parts
        if nested and not ("nested_quant_map" in parts and isinstance(state.get("nested_blocksize"), int)):
            raise self.refuse("double quantization without its nested_quant_map or nested_blocksize", state_name)
        dtype = DTYPES.get(str(state.get("dtype", "float32")).removeprefix("torch."), torch.float32)
        settings = {"shape": shape, "blocksize": blocksize, "nested": nested, "state": state}
        label = f"bnb {kind}" + (" (double quant)" if nested else "")
        return Group(prefix + ".weight", parts, shape, dtype, label, settings)

    def _state(self, name: str) -> dict[str, Any]:
        raw = self.ckpt.get(name)
        try:
            state = json.loads(bytes(raw.to(torch.uint8).tolist()).decode())
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise self.refuse("its quant state is not JSON", name) from None
        if not isinstance(state, dict):
            raise self.refuse("its quant state is not a JSON object", name)
        return state

    def _eight_bit(self, scb: str) -> Group:
        prefix = scb.removesuffix(".SCB")
        weight = prefix + ".weight"
        if weight not in self.ckpt or self.ckpt.info(weight).dtype != "I8":
            raise self.refuse(f"has SCB but no int8 {weight}", scb)
        rows, cols = self.shape_of(weight)
        if self.shape_of(scb) != (rows,):
            raise self.refuse(f"SCB has {list(self.shape_of(scb))} entries for {rows} rows", scb)
        return Group(weight, {"weight": weight, "SCB": scb}, (rows, cols), torch.float32, "bnb int8", {})

    def decode(self, parts: dict[str, torch.Tensor], group: Group) -> torch.Tensor:
        if "SCB" in parts:
            return parts["weight"] * parts["SCB"].float().view(-1, 1) * INVERSE_127
        s = group.settings
        absmax = parts["absmax"]
        if s["nested"]:
            codes = parts["nested_quant_map"].float()[absmax.to(torch.int64)]
            absmax = blockwise(codes, parts["nested_absmax"].float(), s["state"]["nested_blocksize"])
            absmax = absmax + torch.tensor(float(s["state"].get("nested_offset", 0.0)))  # float32, as bnb adds it
        packed = parts["weight"].reshape(-1).view(torch.uint8)
        codes = torch.empty(packed.numel() * 2, dtype=torch.int64)
        codes[0::2], codes[1::2] = packed >> 4, packed & 0x0F
        numel = math.prod(s["shape"])
        values = parts["quant_map"].float()[codes][:numel]
        return blockwise(values, absmax.float(), s["blocksize"]).reshape(s["shape"])


def blockwise(values: torch.Tensor, scale: torch.Tensor, blocksize: int) -> torch.Tensor:
    """values[i]·scale[i // blocksize] in float32, the last block possibly short."""
    n = values.numel()
    full = n - n % blocksize
    out = torch.empty(n, dtype=torch.float32)
    out[:full] = (values[:full].view(-1, blocksize) * scale[: full // blocksize].view(-1, 1)).reshape(full)
    if full < n:
        out[full:] = values[full:] * scale[full // blocksize]
    return out
