"""Two-rank process groups for the transfer, built directly on torch.distributed.

The source is rank 0 and hosts the TCPStore on a socket it bound beforehand (no port
race); the client is rank 1. Every key of the rendezvous lives under a prefix made of
the session id, which the client learns only over the authenticated control channel:
anyone else who reaches the store port cannot register as the peer rank (and so cannot
receive the weights or feed the client), because they cannot name the keys. The store
waits at most `setup_timeout_s` for the peer; afterwards every send/recv is bounded by
`op_timeout_s`.

Accelerator communicators are made abort-only: by default a timed-out or failed
NCCL/HCCL operation tears the whole process down (TORCH_NCCL_ASYNC_ERROR_HANDLING=3,
HCCL_ASYNC_ERROR_HANDLING=1), which on a source would kill a serving vLLM instance
because one client stalled. The error-handling mode is read from the environment when a
backend is constructed, so it is set for the construction of transfer groups only
(under a lock) and restored afterwards; vLLM's own groups keep their settings.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import os
import secrets
import socket
import threading
import time
from datetime import timedelta

import torch
from torch.distributed import PrefixStore, ProcessGroup, TCPStore

from loader.config import MAX_STREAMS

SOURCE_RANK = 0
CLIENT_RANK = 1
WORLD_SIZE = 2

BACKEND_BY_DEVICE = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}

# env values for the construction of transfer communicators: abort the communicator on
# error or timeout, never the process; no heartbeat monitor that could kill it either
ABORT_ONLY_ENV = {
    "nccl": {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "2", "TORCH_NCCL_ENABLE_MONITORING": "0"},
    "hccl": {"HCCL_ASYNC_ERROR_HANDLING": "0"},
}
_env_lock = threading.Lock()
_JOINED_KEY = "client-joined"
# tags at and above this are never bucket tags (those are below 2**30)
FENCE_TAG_BASE = 1 << 30
_FENCE_TRIES = 4
# a multiple of every stream count n <= MAX_STREAMS: fences on n (or more) consecutive
# residues of it fall on every residue modulo n, i.e. on every context
_FENCE_MODULUS = math.lcm(*range(1, MAX_STREAMS + 1))

log = logging.getLogger(__name__)


def backend_for_device(device_type: str) -> str:
    try:
        return BACKEND_BY_DEVICE[device_type]
    except KeyError:
        raise ValueError(f"no transfer backend for device type {device_type!r}") from None


def store_prefix(session_id: str) -> str:
    return f"netloader/{session_id}/"


def create_transfer_group(
    device_type: str,
    host: str,
    port: int,
    rank: int,
    session_id: str,
    setup_timeout_s: float,
    op_timeout_s: float,
    listen_socket: socket.socket | None = None,
    streams: int = 1,
) -> ProcessGroup:
    """Rendezvous with the peer under the session's secret prefix and build the group.

    The source passes the listening socket it bound (the store takes it over); the
    client connects to host:port. A Gloo group spreads its operations over `streams`
    connections (both ranks must ask for the same number: the source announces it)."""
    backend = backend_for_device(device_type)
    setup_timeout = timedelta(seconds=setup_timeout_s)
    store = _tcp_store(host, port, rank, setup_timeout, listen_socket)
    prefix_store = PrefixStore(store_prefix(session_id), store)
    # the backends' own rendezvous waits with the op timeout; a client that got an ack
    # and never comes must not hold the source for that long: wait for it here first
    if rank == SOURCE_RANK:
        prefix_store.wait([_JOINED_KEY], setup_timeout)
    else:
        prefix_store.set(_JOINED_KEY, b"1")
    op_timeout = timedelta(seconds=op_timeout_s)
    if backend == "gloo":
        return _gloo_group(prefix_store, rank, op_timeout, streams)
    # NCCL/HCCL constructors only read their settings (communicators come up lazily, at
    # the first operation), so the env lock is never held while waiting for the peer
    with _abort_only_env(backend):
        if backend == "nccl":
            return _nccl_group(prefix_store, rank, op_timeout)
        from loader.transfer.process_group_npu import hccl_group  # needs torch_npu

        return hccl_group(prefix_store, rank, op_timeout, session_id)


def _tcp_store(host, port, rank, timeout, listen_socket) -> TCPStore:
    if rank == SOURCE_RANK:
        if listen_socket is None:
            raise ValueError("the source rank hosts the store on a socket it bound")
        fd = listen_socket.detach()
        try:
            # wait_for_workers=False: anyone may connect to the port, so counting
            # connections proves nothing; the prefixed rendezvous keys do
            return TCPStore(
                host, port, WORLD_SIZE, True, timeout,
                wait_for_workers=False, master_listen_fd=fd,
            )
        except Exception:
            socket.close(fd)
            raise
    return TCPStore(host, port, WORLD_SIZE, False, timeout, wait_for_workers=False)


def _gloo_group(prefix_store, rank, timeout, streams: int) -> ProcessGroup:
    """One Gloo context per stream, each on a device (a connection and an I/O thread) of
    its own: Gloo runs an operation tagged t on context t % streams, so consecutive
    buckets (consecutive tags) travel side by side and each connection's kernel copy
    runs on its own thread."""
    from torch.distributed.distributed_c10d import ProcessGroupGloo

    if not 1 <= streams <= MAX_STREAMS:
        raise ValueError(f"streams must be in 1..{MAX_STREAMS}, got {streams}")
    options = ProcessGroupGloo._Options()
    options._timeout = timeout
    options._devices = _gloo_devices(streams)
    pg = ProcessGroup(prefix_store, rank, WORLD_SIZE)
    backend = ProcessGroupGloo(prefix_store, rank, WORLD_SIZE, options)
    backend._set_sequence_number_for_group()
    pg._set_default_backend(ProcessGroup.BackendType.GLOO)
    pg._register_backend(torch.device("cpu"), ProcessGroup.BackendType.GLOO, backend)
    return pg


def _gloo_devices(count: int) -> list:
    """`count` Gloo devices, on the interfaces GLOO_SOCKET_IFNAME lists (in turn) or, when
    it is unset, on the address the hostname resolves to: as torch's own constructor
    picks its device."""
    from torch.distributed.distributed_c10d import ProcessGroupGloo

    interfaces = [i for i in os.environ.get("GLOO_SOCKET_IFNAME", "").split(",") if i]
    if not interfaces:
        return [ProcessGroupGloo.create_default_device() for _ in range(count)]
    return [ProcessGroupGloo.create_device(interface=interfaces[i % len(interfaces)]) for i in range(count)]


def _nccl_group(prefix_store, rank, timeout) -> ProcessGroup:
    from torch.distributed.distributed_c10d import ProcessGroupNCCL

    options = ProcessGroupNCCL.Options()
    options._timeout = timeout
    options.is_high_priority_stream = False  # never ahead of inference's own kernels
    pg = ProcessGroup(prefix_store, rank, WORLD_SIZE)
    backend = ProcessGroupNCCL(prefix_store, rank, WORLD_SIZE, options)
    backend._set_sequence_number_for_group()
    pg._set_default_backend(ProcessGroup.BackendType.NCCL)
    pg._register_backend(torch.device("cuda"), ProcessGroup.BackendType.NCCL, backend)
    return pg


@contextlib.contextmanager
def _abort_only_env(backend: str):
    settings = ABORT_ONLY_ENV.get(backend, {})
    with _env_lock:
        saved = {k: os.environ.get(k) for k in settings}
        os.environ.update(settings)
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def wait_for_store(host: str, port: int, timeout_s: float, cancelled=lambda: False) -> None:
    """Return once the peer's store accepts TCP connections; TimeoutError after timeout_s.

    torch's TCPStore client retries its connect in C++ while holding the GIL, freezing
    every Python thread of the process (a vLLM worker's watchdog and mesh agent too)
    until its own timeout. Python's socket calls release the GIL, so probe first and
    enter C++ only when the store is known to answer.
    """
    deadline = time.monotonic() + timeout_s
    last_error: OSError | None = None
    while True:
        if cancelled():
            raise TimeoutError(f"store {host}:{port}: abandoned")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"store {host}:{port} not reachable within {timeout_s:g}s: {last_error}")
        try:
            with socket.create_connection((host, port), timeout=min(1.0, remaining)):
                return
        except OSError as exc:
            last_error = exc
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))


def fence_gloo(pg: ProcessGroup) -> bool:
    """Close every connection of a Gloo group, so that nothing posted on it can write
    into memory again: True once that is so.

    Gloo's abort() and shutdown() leave posted receives armed (bytes the peer sends
    later still land in their buffers) and do not wake a thread blocked in wait(). A
    receive that times out in wait() does both: Gloo closes every pair of the context
    (taking each pair's lock, so no read is in progress when wait() raises), pending
    operations fail, their waiters wake. So post a receive on a random tag no bucket
    uses and wait for it for a millisecond, once per context: a group of n streams runs
    tag t on context t % n, and fences on n consecutive tags (modulo a multiple of n)
    reach every context. Closing a context's pairs waits for a tick of its I/O loop (up
    to 10 ms), so the group's contexts are fenced side by side, one thread each (all
    MAX_STREAMS residues when the backend does not tell how many contexts it has).
    Should the peer complete a fence (it would have to guess a 30-bit tag ahead of
    time), another tag of that residue is tried."""
    count = _context_count(pg)
    fenced = [False] * count

    def fence(residue: int) -> None:
        fenced[residue] = _fence_context(pg, residue)

    others = [
        threading.Thread(target=fence, args=(r,), name=f"netloader-fence-{r}", daemon=True)
        for r in range(1, count)
    ]
    for thread in others:
        thread.start()
    fence(0)
    for thread in others:
        thread.join()  # bounded: _FENCE_TRIES tries, each a 1 ms wait and a loop tick
    closed = all(fenced)
    if not closed:
        log.error("netloader: could not close a gloo transfer group: its peer completed every fence")
    return closed


def _context_count(pg: ProcessGroup) -> int:
    """How many contexts a Gloo group runs: one per device it was built with."""
    try:
        count = len(pg._get_backend(torch.device("cpu")).options._devices)
    except Exception:  # a torch that does not expose them: fence every residue
        return MAX_STREAMS
    return count if 1 <= count <= MAX_STREAMS else MAX_STREAMS


def _fence_context(pg: ProcessGroup, residue: int) -> bool:
    """Fence the context that runs tags congruent to `residue` modulo the stream count."""
    steps = FENCE_TAG_BASE // _FENCE_MODULUS
    for _ in range(_FENCE_TRIES):
        tag = FENCE_TAG_BASE + _FENCE_MODULUS * secrets.randbelow(steps - 1) + residue
        try:
            peer = WORLD_SIZE - 1 - pg.rank()
            pill = pg.recv([torch.empty(1, dtype=torch.uint8)], peer, tag)
            pill.wait(timedelta(milliseconds=1))
        except Exception:
            return True  # timed out (pairs now closed), or already closed
    return False


def _is_gloo(pg) -> bool:
    try:
        return isinstance(pg, ProcessGroup) and pg._get_backend_name() == "gloo"
    except Exception:
        return False


def destroy_group(pg: ProcessGroup | None) -> None:
    """Best effort: abort pending work first so a blocked peer op errors out. A Gloo
    group is fenced first (fence_gloo): afterwards none of its receives can write."""
    if pg is None:
        return
    if _is_gloo(pg):
        fence_gloo(pg)
    for method in ("abort", "shutdown"):
        fn = getattr(pg, method, None)
        if fn is None:
            continue
        try:
            fn()
            return
        except Exception:
            continue


_releases: set[threading.Thread] = set()
_releases_lock = threading.Lock()
_RELEASE_AT_EXIT_S = 2.0


def discard_group(owner, quiet: bool = False) -> None:
    """Destroy the group `owner.pg` (destroy_group: fenced first), set `owner.pg` to None
    and drop the group in a daemon thread. A Gloo group's destructor joins its
    I/O loops, each waiting out a tick of up to 10 ms (it releases the GIL): nothing the
    caller does next needs to wait for that. The caller must hold no other reference.

    `quiet`: every receive ever posted on the group has completed, so nothing can land
    through it any more; then the fence (another loop tick per context) runs in that
    thread too."""
    box = [owner.pg]
    owner.pg = None
    if box[0] is None:
        return
    if not quiet:
        destroy_group(box[0])

    def release() -> None:
        if quiet:
            destroy_group(box[0])
        box.pop()  # the last reference: the destructor runs in this thread
        with _releases_lock:
            _releases.discard(thread)

    thread = threading.Thread(target=release, name="netloader-group-release", daemon=True)
    with _releases_lock:
        _releases.add(thread)
    thread.start()


@atexit.register
def _finish_releases() -> None:
    """A destructor cut short by the interpreter's exit would abort the process."""
    with _releases_lock:
        pending = list(_releases)
    for thread in pending:
        thread.join(_RELEASE_AT_EXIT_S)


def bind_store_socket(host: str) -> socket.socket:
    """A listening socket on a free port for the TCPStore the source hosts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(8)
    return sock
