"""Connecting to a Ray cluster within a bounded time, or one line saying why not.

Left alone, `ray.init` retries a dead address for minutes, writes its C++ warnings straight to
file descriptor 2 and cannot be interrupted. Here the address is first probed with a plain TCP
connection to its port (name resolution included), then Ray connects; each step runs on a helper
thread that the main thread waits for in short slices, so the whole connection ends within
`timeout` seconds and SIGINT/SIGTERM end the wait as they end any other work (exit 130/143).
While Ray connects, whatever it writes to the process's stderr goes to a log file, named in
the error if the connection fails.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from weightlab.errors import InvalidArgument

CONNECT_TIMEOUT = 15.0  # seconds: a healthy cluster answers in about one
GCS_PORT = 6379  # Ray's default head port, when an address names none
INSTALL = 'install Ray to use --ray: pip install "weightlab[ray]"'


def ray_log() -> Path:
    """Where Ray's own output goes while weightlab connects."""
    return Path(tempfile.gettempdir()) / f"weightlab-ray-{os.getpid()}.log"


def host_and_port(target: str, where: str) -> tuple[str, int]:
    """(host, port) of a Ray address: `host:port`, `[v6]:port`, `ray://host:port` or a bare host."""
    rest = target.split("://", 1)[1] if "://" in target else target
    host, port = rest, str(GCS_PORT)
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        port = tail.removeprefix(":") or port
    elif ":" in rest:
        host, _, port = rest.partition(":")
    if (
        not host
        or not port.isdigit()
        or not 0 < int(port) < 65536
        or any(c in host for c in "/ []")
        or (":" in host and not rest.startswith("["))
    ):
        raise InvalidArgument(f"{where}: not a Ray address (write HOST:PORT, e.g. 10.0.0.5:6379, or auto)")
    return host, int(port)


def within(deadline: float, step: Callable[[], Any], what: str) -> Any:
    """`step()` on a helper thread, waited for until `deadline` (monotonic seconds): its result,
    its exception re-raised, or TimeoutError. The wait wakes often, so signal handlers run."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = step()
        except BaseException as e:  # handed to the waiting thread
            box["error"] = e

    helper = threading.Thread(target=run, name=f"weightlab-{what}", daemon=True)
    helper.start()
    while helper.is_alive() and time.monotonic() < deadline:
        helper.join(0.05)
    if helper.is_alive():
        raise TimeoutError(what)
    if "error" in box:
        raise box["error"]
    return box.get("value")


@contextmanager
def stderr_to(log: Path) -> Iterator[None]:
    """Point file descriptor 2 at `log` (Ray's C++ logging writes there directly), and back when
    Ray connected. When it did not, a connection attempt may still be running: file descriptor 2
    stays on the log and Python's stderr moves to the terminal, so the error line is all one sees."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(log, "ab") as file:
        os.dup2(file.fileno(), 2)
    try:
        yield
    except BaseException:
        if _writes_to_fd2(sys.stderr):
            sys.stderr = os.fdopen(saved, "w", buffering=1, encoding=sys.stderr.encoding, errors="backslashreplace")
        else:  # stderr is captured elsewhere (a test harness): put the descriptor back
            os.dup2(saved, 2)
            os.close(saved)
        raise
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)


def _writes_to_fd2(stream: Any) -> bool:
    try:
        return bool(stream.fileno() == 2)
    except (AttributeError, OSError, ValueError):
        return False


def connect(address: str, timeout: float = CONNECT_TIMEOUT) -> Any:
    """The `ray` module, connected to `address` ("auto": $RAY_ADDRESS, else a local cluster) within
    `timeout` seconds, or `InvalidArgument` naming the address and why."""
    try:
        import ray
    except ImportError:
        raise InvalidArgument(INSTALL) from None
    if ray.is_initialized():
        return ray
    target = os.environ.get("RAY_ADDRESS") if address == "auto" else address
    options: dict[str, Any] = dict(
        ignore_reinit_error=True, log_to_driver=False, include_dashboard=False, configure_logging=False
    )
    if not target:  # a cluster on this machine: Ray starts one (or joins the one running here)
        ray.init(**options)
        return ray
    where = f"--ray {address}" + (f" (RAY_ADDRESS={target})" if address == "auto" else "")
    host, port = host_and_port(target, where)
    deadline = time.monotonic() + timeout
    try:
        within(deadline, lambda: socket.create_connection((host, port), timeout=timeout).close(), "probe")
    except TimeoutError:
        raise InvalidArgument(
            f"{where}: no answer from {host}:{port} within {timeout:g} s (is the cluster up, "
            "and the address right? see --ray-timeout)"
        ) from None
    except OSError as e:
        reason = "unknown host" if isinstance(e, socket.gaierror) else (e.strerror or str(e)).lower()
        raise InvalidArgument(f"{where}: cannot reach a Ray cluster at {host}:{port} ({reason})") from None
    log = ray_log()
    with stderr_to(log):
        try:
            within(deadline, lambda: ray.init(address=target, **options), "ray-init")
        except TimeoutError:
            raise InvalidArgument(
                f"{where}: {host}:{port} answers but no Ray cluster connected within {timeout:g} s (Ray's log: {log})"
            ) from None
        except (ConnectionError, ValueError, RuntimeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise InvalidArgument(f"{where}: cannot connect to a Ray cluster ({first}; Ray's log: {log})") from None
    return ray
