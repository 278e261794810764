"""Two-rank process groups for the transfer, one small function per device type.

All go through vLLM's `stateless_init_torch_distributed_process_group`, which leaves
torch.distributed's global state alone. Use send/recv only: its docstring warns that
broadcast depends on the global rank. The source is rank 0 and hosts the TCPStore on a
socket it bound beforehand (no port race); the client is rank 1.
"""

from __future__ import annotations

import socket
import time
from datetime import timedelta

from torch.distributed import ProcessGroup
from vllm.distributed.utils import stateless_init_torch_distributed_process_group

SOURCE_RANK = 0
CLIENT_RANK = 1

BACKEND_BY_DEVICE = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}


def backend_for_device(device_type: str) -> str:
    try:
        return BACKEND_BY_DEVICE[device_type]
    except KeyError:
        raise ValueError(f"no transfer backend for device type {device_type!r}") from None


def create_transfer_group(
    device_type: str,
    host: str,
    port: int,
    rank: int,
    timeout_s: float,
    listen_socket: socket.socket | None = None,
) -> ProcessGroup:
    """Rendezvous with the peer; `timeout_s` bounds setup and every later send/recv."""
    timeout = timedelta(seconds=timeout_s)
    if device_type == "cpu":
        return gloo_group(host, port, rank, timeout, listen_socket)
    if device_type == "cuda":
        return nccl_group(host, port, rank, timeout, listen_socket)
    if device_type == "npu":
        from loader.process_group_npu import hccl_group  # needs torch_npu

        return hccl_group(host, port, rank, timeout, listen_socket)
    raise ValueError(f"no transfer backend for device type {device_type!r}")


def gloo_group(host, port, rank, timeout, listen_socket=None) -> ProcessGroup:
    return _stateless_group(host, port, rank, "gloo", timeout, listen_socket)


def nccl_group(host, port, rank, timeout, listen_socket=None) -> ProcessGroup:
    return _stateless_group(host, port, rank, "nccl", timeout, listen_socket)


def _stateless_group(host, port, rank, backend, timeout, listen_socket) -> ProcessGroup:
    return stateless_init_torch_distributed_process_group(
        host, port, rank, 2, backend, listen_socket=listen_socket, timeout=timeout
    )


def wait_for_store(host: str, port: int, timeout_s: float) -> None:
    """Return once the peer's store accepts TCP connections; TimeoutError after timeout_s.

    torch's TCPStore client retries its connect in C++ while holding the GIL, freezing
    every Python thread of the process (a vLLM worker's watchdog and mesh agent too)
    until its own timeout. Python's socket calls release the GIL, so probe first and
    enter C++ only when the store is known to answer.
    """
    deadline = time.monotonic() + timeout_s
    last_error: OSError | None = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"store {host}:{port} not reachable within {timeout_s:g}s: {last_error}")
        try:
            with socket.create_connection((host, port), timeout=min(1.0, remaining)):
                return
        except OSError as exc:
            last_error = exc
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))


def destroy_group(pg: ProcessGroup | None) -> None:
    """Best effort: abort pending work first so a blocked peer op errors out."""
    if pg is None:
        return
    for method in ("abort", "shutdown"):
        fn = getattr(pg, method, None)
        if fn is None:
            continue
        try:
            fn()
            return
        except Exception:
            continue


def bind_store_socket(host: str) -> socket.socket:
    """A listening socket on a free port for the TCPStore the source hosts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(8)
    return sock
