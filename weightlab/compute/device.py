"""Where and in what precision the maths runs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from weightlab.errors import InvalidArgument

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def resolve_device(spec: str = "auto") -> torch.device:
    """`auto` is the first GPU when there is one, else the CPU."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise InvalidArgument(f"--device {spec!r} is not a device (use auto, cpu or cuda[:N])") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgument(f"--device {spec}: no CUDA GPU is available on this machine")
    return device


def resolve_dtype(name: str = "float32") -> torch.dtype:
    if name not in DTYPES:
        raise InvalidArgument(f"--dtype {name!r}: choose float32 or float64")
    return DTYPES[name]


@dataclass(frozen=True)
class Compute:
    """Device, precision and batching of an analysis."""

    device: torch.device
    dtype: torch.dtype
    batch_size: int  # same-shape matrices per decomposition call: batching pays off on GPUs
    prefetch: int = 2

    @classmethod
    def create(cls, device: str = "auto", dtype: str = "float32", batch_size: int | None = None) -> "Compute":
        dev = resolve_device(device)
        return cls(dev, resolve_dtype(dtype), batch_size or (8 if dev.type == "cuda" else 1))
