"""Tensors in memory behind the interface of a safetensors file, for models held in memory (`io.memory`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from weightlab.errors import InvalidArgument, UnsupportedDtype
from weightlab.io.safetensors_file import CODE_OF_TORCH_DTYPE, TensorInfo


class TensorStore:
    """Tensors in memory behind the interface of a safetensors file (`path`, `infos`, `read`):
    each read copies one tensor (or rows of it) to the CPU, so what is read may be changed
    freely and the model stays as it was."""

    def __init__(self, label: str, tensors: Mapping[str, torch.Tensor]):
        self.path = Path(label)
        self.tensors = tensors
        self.metadata: dict[str, str] = {}
        self.infos = {}
        for name, t in tensors.items():
            if t.is_meta:
                raise InvalidArgument("is on the meta device: its values were never loaded", label, name)
            if t.layout != torch.strided:
                raise InvalidArgument(
                    f"is a {str(t.layout).removeprefix('torch.')} tensor; give dense tensors", label, name
                )
            if t.dtype not in CODE_OF_TORCH_DTYPE:
                raise UnsupportedDtype(f"dtype {str(t.dtype).removeprefix('torch.')} is not supported", label, name)
            self.infos[name] = TensorInfo(
                name, tuple(t.shape), CODE_OF_TORCH_DTYPE[t.dtype], self.path, -1, t.numel() * t.element_size()
            )

    def read(self, info: TensorInfo, rows: tuple[int, int] | None = None) -> torch.Tensor:
        tensor = self.tensors[info.name].detach()
        if rows is not None:
            tensor = tensor[rows[0] : rows[1]]
        return tensor.to("cpu", copy=True).contiguous()
