"""Where, in what precision and on how many threads the maths runs."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

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


def available_cpus() -> int:
    """The CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (a container
    given 2 CPUs of a 64-core host must not start 64 threads)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cpus


def use_threads(threads: int) -> None:
    """Run torch's and the BLAS libraries' (scipy's OpenBLAS) kernels on `threads` threads."""
    torch.set_num_threads(threads)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - a declared dependency; without it BLAS keeps its own count
        return
    threadpool_limits(threads)


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
    def create(
        cls,
        device: str = "auto",
        dtype: str = "float32",
        batch_size: int | None = None,
        cluster: str | None = None,
        cluster_timeout: float | None = None,
        threads: int | None = None,
    ) -> Compute:
        """Validated options; with `cluster`, connected to it now (a dead address fails before any
        work); the maths on `threads` threads (default: the CPUs this process may use)."""
        Int(1, 4096, optional=True).check("batch size", batch_size)
        Int(1, 1024, optional=True).check("--threads", threads)
        Real(0, 3600, low_open=True, optional=True).check("--ray-timeout", cluster_timeout)
        if cluster_timeout is not None and cluster is None:
            raise InvalidArgument("--ray-timeout bounds the connection to a cluster: it needs --ray")
        dev = resolve_device(device)
        timeout = CONNECT_TIMEOUT if cluster_timeout is None else cluster_timeout
        if cluster is not None:
            connect(cluster, timeout)
        use_threads(threads or available_cpus())
        return cls(
            dev,
            resolve_dtype(dtype),
            batch_size or (8 if dev.type == "cuda" else 1),
            cluster=cluster,
            cluster_timeout=timeout,
            requested=device,
        )

    def on_this_node(self) -> Compute:
        """This compute as a Ray worker runs it: its own device (its GPU when it has one and
        `--device auto`), batched as that device likes, nothing further distributed."""
        device = resolve_device(self.requested)
        return replace(self, device=device, batch_size=8 if device.type == "cuda" else 1, cluster=None)
