"""Where and in what precision the maths runs."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

import torch

from weightlab.compute.ray_connect import CONNECT_TIMEOUT, connect
from weightlab.domains import Choice, Int, Real
from weightlab.errors import InvalidArgument

DTYPES = {"float32": torch.float32, "float64": torch.float64}


DEVICE = re.compile(r"auto|cpu|cuda(:\d{1,3})?")


def resolve_device(spec: str = "auto") -> torch.device:
    """`auto` is the first GPU when there is one, else the CPU; `cuda:N` must exist."""
    if not isinstance(spec, str) or not DEVICE.fullmatch(spec):
        raise InvalidArgument(f"--device {spec!r}: use auto, cpu, cuda or cuda:N")
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgument(f"--device {spec}: no CUDA GPU is available on this machine")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise InvalidArgument(f"--device {spec}: this machine has {torch.cuda.device_count()} GPUs")
    return device


def resolve_dtype(name: str = "float32") -> torch.dtype:
    Choice(*DTYPES).check("--dtype", name)
    return DTYPES[name]


@dataclass(frozen=True)
class Compute:
    """Device, precision and batching of an analysis."""

    device: torch.device
    dtype: torch.dtype
    batch_size: int  # same-shape matrices per decomposition call: batching pays off on GPUs
    prefetch: int = 2
    cluster: str | None = None  # a Ray address ("auto": $RAY_ADDRESS or a local cluster); None runs here
    cluster_timeout: float = CONNECT_TIMEOUT  # seconds to connect to it (`compute.ray_connect`)
    requested: str = "auto"  # the --device asked for: each Ray worker resolves it on its own node
    threads: int = field(default_factory=torch.get_num_threads)  # math threads (Ray workers match it)

    @classmethod
    def create(cls, device: str = "auto", dtype: str = "float32", batch_size: int | None = None,
               cluster: str | None = None, cluster_timeout: float | None = None) -> "Compute":
        """Validated options; with `cluster`, connected to it now (a dead address fails before any work)."""
        Int(1, 4096, optional=True).check("batch size", batch_size)
        Real(0, 3600, low_open=True, optional=True).check("--ray-timeout", cluster_timeout)
        if cluster_timeout is not None and cluster is None:
            raise InvalidArgument("--ray-timeout bounds the connection to a cluster: it needs --ray")
        dev = resolve_device(device)
        timeout = CONNECT_TIMEOUT if cluster_timeout is None else cluster_timeout
        if cluster is not None:
            connect(cluster, timeout)
        return cls(dev, resolve_dtype(dtype), batch_size or (8 if dev.type == "cuda" else 1), cluster=cluster,
                   cluster_timeout=timeout, requested=device)

    def on_this_node(self) -> "Compute":
        """This compute as a Ray worker runs it: its own device (its GPU when it has one and
        `--device auto`), batched as that device likes, nothing further distributed."""
        device = resolve_device(self.requested)
        return replace(self, device=device, batch_size=8 if device.type == "cuda" else 1, cluster=None)
