"""Weight server: serves one rank's tensors to clients that start after it.

One background thread owns a ZeroMQ ROUTER socket and answers handshakes; each
accepted client gets its own session thread with its own 2-rank process group on a
fresh port, so a slow transfer never blocks other clients' handshakes. At most
`max_concurrent_clients` sessions run at once; beyond that a client gets "busy".
Nothing raises out of the threads: bad messages are counted and logged.
"""

from __future__ import annotations

import logging
import queue
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import zmq

from loader.config import TransferSettings
from loader.transfer import protocol
from loader.transfer.buckets import Bucket, BucketReader, bucket_tag, plan_buckets
from loader.transfer.checksum import algorithm_for_device, checksum_key, digest
from loader.transfer.device import TransferDevice, await_work, device_for, session_device_bytes
from loader.transfer.manifest import build_manifest, unique_tensors
from loader.transfer.process_group import (
    CLIENT_RANK,
    SOURCE_RANK,
    backend_for_device,
    bind_store_socket,
    create_transfer_group,
    destroy_group,
)
from mesh.addresses import outbound_ip

log = logging.getLogger(__name__)

_POLL_MS = 1000
SEND_DEPTH = 4  # sends in flight; the client posts as many receives ahead
_BAD_MESSAGE_LOG_FIRST = 10


def max_pending_per_peer(max_clients: int) -> int:
    """Sessions whose process group is not up yet, per client address: a peer that sends
    hellos and never connects holds at most this many slots, each for pg_setup_timeout_s,
    and never all of them once there are three or more; two instances on one host can
    always start together."""
    return max(2, max_clients - 1)

_MIB = 1 << 20
# the bucket sizes a source serves (plus its own): a client cannot make it hash the
# model again for arbitrary sizes, and the checksums of every size stay cached
BUCKET_SIZES = tuple(_MIB << k for k in (0, 2, 4, 6, 8))


def choose_bucket_bytes(own: int, client_max: int) -> int | None:
    """The largest served size that is at most both ours and the client's; None if none."""
    fitting = [b for b in (*BUCKET_SIZES, own) if b <= min(own, client_max)]
    return max(fitting, default=None)


@dataclass(frozen=True)
class ServedPlan:
    """What a session sends: the buckets and their keyed checksums."""

    buckets: list[Bucket]
    checksums: tuple[str, ...]


@dataclass
class _Session:
    session_id: str
    identity: bytes
    hello: protocol.Hello
    bucket_bytes: int
    peer_address: str = ""
    group_up: bool = False  # process group set up: no longer counts as pending
    done: threading.Event = field(default_factory=threading.Event)
    done_message: protocol.Done | None = None
    pg: object | None = None
    thread: threading.Thread | None = None


class _Send:
    """An in-flight send. Gloo counts completions per buffer, so waiting twice on one
    send blocks until a later send completes: complete() waits only once."""

    def __init__(self, work, data: torch.Tensor, what: str) -> None:
        self.work = work
        self.data = data  # keeps a temporary (non-contiguous source) alive until sent
        self.what = what
        self.done = False

    def complete(self, device: TransferDevice, timeout_s: float) -> None:
        if not self.done:
            await_work(self.work, device, timeout_s, self.what)
            self.done = True


class WeightServer:
    """Serve `tensors` (this rank's raw weights; they must not change while served).

    `device` is the transfer device (the one the clients' tensors live on, whose backend
    moves the data); served tensors are on it or in host memory (copies kept only to be
    served), from where each bucket is staged onto the device. Default: the tensors' own.
    `admission()` may return a "busy" reason to refuse new sessions for now (e.g. while
    vLLM warms up).

    Tensors sharing storage (tied weights) are sent once. `port=0` picks a free port.
    With `keys` (mesh.security.ClusterKeys) the control socket requires CURVE auth.
    """

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        fingerprint: str,
        rank: int,
        settings: TransferSettings,
        keys=None,
        host: str = "0.0.0.0",
        port: int = 0,
        output_prefix: str | None = None,
        device: torch.device | None = None,
    ) -> None:
        self._tensors, _ = unique_tensors(tensors)
        self._manifest = build_manifest(tensors)
        self._manifest_digest = self._manifest.digest()
        if device is None:
            devices = {t.device for t in self._tensors.values()} or {torch.device("cpu")}
            if len({d.type for d in devices}) != 1:
                raise ValueError(f"tensors span several device types: {sorted(map(str, devices))}")
            device = next(iter(devices))
        stray = {t.device.type for t in self._tensors.values()} - {device.type, "cpu"}
        if stray:
            raise ValueError(f"tensors on {sorted(stray)} cannot be served from {device}")
        # the index the tensors were allocated with (a bare "cuda" means another device
        # in a worker whose local rank is not 0)
        device = next((t.device for t in self._tensors.values() if t.device.type == device.type), device)
        self._device = device
        self._device_type = device.type
        self._backend = backend_for_device(self._device_type)
        self._algorithm = algorithm_for_device(self._device_type)
        self._checksum_key = checksum_key(keys)
        self.fingerprint = fingerprint
        self.rank = rank
        self.settings = settings
        self._keys = keys
        self._host = host
        self._port = port
        self._output_prefix = output_prefix
        self._plans: dict[int, ServedPlan] = {}
        self._plan_lock = threading.Lock()
        self._sessions: dict[str, _Session] = {}
        self._sessions_lock = threading.Lock()
        self._outbox: queue.Queue[tuple[bytes, bytes]] = queue.Queue()
        self._stopping = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._context: zmq.Context | None = None
        self._router: zmq.Socket | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_w.setblocking(False)
        self.bad_messages = 0
        self.admission: Callable[[], str | None] | None = None
        self.retained_bytes = 0  # bytes kept only to be served (reported in the mesh)
        self.endpoint: str | None = None

    # ---- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        from mesh.security import secure_server

        self._context = zmq.Context()
        router = self._context.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.MAXMSGSIZE, self.settings.max_message_bytes)
        router.setsockopt(zmq.ROUTER_MANDATORY, 0)
        if ":" in self._host:
            router.setsockopt(zmq.IPV6, 1)
        secure_server(router, self._keys)
        bind_host = f"[{self._host}]" if ":" in self._host else self._host
        if self._port:
            router.bind(f"tcp://{bind_host}:{self._port}")
            port = self._port
        else:
            port = router.bind_to_random_port(f"tcp://{bind_host}")
        self._router = router
        self.endpoint = f"{self._advertised_host()}:{port}"
        if self._output_prefix:
            self._write_endpoint_file()
        self._thread = threading.Thread(
            target=self._run, name=f"netloader-server-r{self.rank}", daemon=True
        )
        self._thread.start()
        threading.Thread(
            target=self._precompute, name=f"netloader-checksums-r{self.rank}", daemon=True
        ).start()
        log.info(
            "netloader server rank %d serving %d tensors (%.2f GiB) at %s%s",
            self.rank,
            len(self._manifest.specs),
            self._manifest.total_bytes / (1 << 30),
            self.endpoint,
            "" if self._keys else " without authentication (no secret configured)",
        )

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors served, by name (each storage once)."""
        return dict(self._tensors)

    def wait_ready(self, timeout: float | None = None) -> bool:
        """True once checksums for the default bucket size are cached."""
        return self._ready.wait(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self._wake()
        with self._sessions_lock:
            sessions = list(self._sessions.values())
        for s in sessions:
            s.done.set()
            destroy_group(s.pg)
        if self._thread is not None:
            self._thread.join(timeout)
        for s in sessions:
            if s.thread is not None:
                s.thread.join(timeout)
        if self._router is not None:
            self._router.close(linger=0)
            self._router = None
        if self._context is not None:
            from mesh.security import release_context

            release_context(self._context)
            self._context.term()
            self._context = None
        self._wake_r.close()
        self._wake_w.close()

    @property
    def active_clients(self) -> int:
        with self._sessions_lock:
            return len(self._sessions)

    # ---- control loop ----------------------------------------------------------------

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        # pyzmq reports a plain socket by its file descriptor, not the object registered
        wake_fd = self._wake_r.fileno()
        poller.register(wake_fd, zmq.POLLIN)
        while not self._stopping.is_set():
            try:
                events = dict(poller.poll(_POLL_MS))
                if wake_fd in events:
                    self._drain_wakeups()
                self._flush_outbox()
                if self._router in events:
                    self._handle_incoming()
                    self._flush_outbox()  # refusals are answered from this thread
            except Exception:
                if self._stopping.is_set():
                    break
                log.exception(
                    "netloader server rank %d: control loop error (continuing)", self.rank
                )
                time.sleep(0.1)

    def _handle_incoming(self) -> None:
        for _ in range(100):
            try:
                frames = self._router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if len(frames) != 2:
                self._bad_message(f"{len(frames)} frames")
                continue
            identity, payload = frames[0].bytes, frames[1].bytes
            try:
                msg = protocol.decode(payload, self.settings.max_message_bytes)
                if msg["type"] == "hello":
                    self._on_hello(identity, protocol.parse_hello(msg), _peer_address(frames[1]))
                elif msg["type"] == "done":
                    self._on_done(identity, protocol.parse_done(msg))
                else:
                    raise protocol.ProtocolError(f"unexpected message type {msg['type'][:40]!r}")
            except protocol.ProtocolError as exc:
                self._bad_message(str(exc))
                self._send(identity, protocol.nack_message(f"bad request: {exc}"))

    def _on_hello(self, identity: bytes, hello: protocol.Hello, peer_address: str) -> None:
        bucket_bytes = choose_bucket_bytes(self.settings.bucket_bytes, hello.max_bucket_bytes)
        reason = self._refusal_reason(hello)
        if reason is None and bucket_bytes is None:
            reason = f"client buckets of at most {hello.max_bucket_bytes} bytes are below 1 MiB"
        if reason:
            log.info("netloader server rank %d: refused a client: %s", self.rank, reason)
            self._send(identity, protocol.nack_message(reason))
            return
        with self._sessions_lock:
            pending = sum(
                1
                for s in self._sessions.values()
                if not s.group_up and s.peer_address == peer_address
            )
            if len(self._sessions) >= self.settings.max_concurrent_clients:
                busy = f"source busy ({len(self._sessions)} transfers running)"
            elif pending >= max_pending_per_peer(self.settings.max_concurrent_clients):
                busy = f"source busy ({pending} sessions from {peer_address} still setting up)"
            else:
                busy = (self.admission and self.admission()) or self._memory_refusal(bucket_bytes)
            if busy:
                self._send(identity, protocol.nack_message(busy, busy=True))
                return
            session = _Session(
                session_id=secrets.token_hex(16),
                identity=identity,
                hello=hello,
                bucket_bytes=bucket_bytes,
                peer_address=peer_address,
            )
            self._sessions[session.session_id] = session
        session.thread = threading.Thread(
            target=self._serve_session,
            args=(session,),
            name=f"netloader-session-r{self.rank}-{session.session_id}",
            daemon=True,
        )
        session.thread.start()

    def _refusal_reason(self, hello: protocol.Hello) -> str | None:
        if hello.rank != self.rank:
            return f"rank mismatch: source serves rank {self.rank}, client is rank {hello.rank}"
        if hello.fingerprint != self.fingerprint:
            return (
                f"fingerprint mismatch: source {self.fingerprint[:16]}, "
                f"client {hello.fingerprint[:16]}"
            )
        if hello.backend != self._backend:
            return f"backend mismatch: source uses {self._backend}, client {hello.backend}"
        difference = hello.manifest.first_difference(self._manifest)
        if difference:
            return f"manifest mismatch: {difference}"
        return None

    def _on_done(self, identity: bytes, done: protocol.Done) -> None:
        with self._sessions_lock:
            session = self._sessions.get(done.session)
        if session is None:
            if not self._stopping.is_set():
                self._bad_message("done for an unknown session")
            return
        if session.identity != identity:  # the session id is the credential; ZeroMQ may reconnect
            log.debug(
                "netloader server rank %d: done for %s arrived on another connection",
                self.rank,
                done.session,
            )
        session.done_message = done
        session.done.set()

    def _memory_refusal(self, bucket_bytes: int) -> str | None:
        """On an accelerator a session needs staging buffers and communicator memory on
        the device, which vLLM may have given to the KV cache: refuse rather than fail."""
        free = self._free_device_bytes()
        need = session_device_bytes(self._backend, bucket_bytes)
        if free is None or free >= need:
            return None
        return f"source busy (device memory: {free >> 20} MiB free, a session needs {need >> 20} MiB)"

    def _free_device_bytes(self) -> int | None:
        if self._device_type == "cpu":
            return None
        return torch.accelerator.get_memory_info(self._device)[0]

    # ---- one client's transfer -------------------------------------------------------

    def _serve_session(self, session: _Session) -> None:
        store_socket = None
        started = time.monotonic()
        device = device_for(self._device)
        try:
            device.enter_thread()  # this thread's device, and a stream of its own
            served = self._plan_for(session.bucket_bytes, device)
            plan = served.buckets
            resume = session.hello.resume
            skip = frozenset()
            if resume is not None and resume.bucket_bytes == session.bucket_bytes:
                skip = resume.indices(len(plan))  # the client verified these already
            store_socket = bind_store_socket(self._store_bind_host())
            ack = protocol.Ack(
                session=session.session_id,
                store_port=store_socket.getsockname()[1],
                bucket_bytes=session.bucket_bytes,
                algorithm=self._algorithm,
                checksums=served.checksums,
                manifest_digest=self._manifest_digest,
                skip=skip,
            )
            self._send(session.identity, protocol.ack_message(ack))
            session.pg = create_transfer_group(
                self._device_type,
                self._store_bind_host(),
                ack.store_port,
                SOURCE_RANK,
                session.session_id,
                self.settings.pg_setup_timeout_s,
                self.settings.bucket_timeout_s,
                listen_socket=store_socket,
            )
            store_socket = None  # owned by the TCPStore now
            with self._sessions_lock:
                session.group_up = True
            to_send = [b for b in plan if b.index not in skip]
            self._send_buckets(session, to_send, device)
            if not session.done.wait(self.settings.bucket_timeout_s):
                raise TimeoutError("client did not confirm the transfer")
            done = session.done_message
            if done is None or not done.ok:
                raise RuntimeError(f"client reported failure: {done.reason if done else 'stopped'}")
            log.info(
                "netloader server rank %d: sent %.2f GiB to a client in %.2fs%s",
                self.rank,
                sum(b.nbytes for b in to_send) / (1 << 30),
                time.monotonic() - started,
                f" (resumed: {len(skip)} of {len(plan)} buckets held already)" if skip else "",
            )
        except Exception as exc:
            if not session.group_up and not self._stopping.is_set():
                # the client is still setting up: tell it now, not after pg_setup_timeout_s
                why = f"{type(exc).__name__}: {str(exc)[:300]}"
                self._send(session.identity, protocol.abort_message(session.session_id, why))
            if not self._stopping.is_set():
                log.warning(
                    "netloader server rank %d: transfer %s failed: %s: %s",
                    self.rank,
                    session.session_id,
                    type(exc).__name__,
                    str(exc)[:300],
                )
        finally:
            if store_socket is not None:
                store_socket.close()
            destroy_group(session.pg)
            device.synchronize()  # after an abort too: nothing of the session still queued
            with self._sessions_lock:
                self._sessions.pop(session.session_id, None)

    def _send_buckets(self, session: _Session, plan: list[Bucket], device: TransferDevice) -> None:
        """Send `plan` (the buckets the client lacks) in order, up to SEND_DEPTH in flight
        (counted by completion, each bounded by bucket_timeout_s).

        Packed buckets alternate between two buffers; a buffer is refilled only after the
        send that used it completed."""
        timeout_s = self.settings.bucket_timeout_s
        reader = BucketReader(self._tensors, device.copy, device.device)
        buffers = [device.empty(reader.staging_bytes(plan)) for _ in range(2)]
        buffer_work: list = [None, None]
        in_flight: deque[_Send] = deque()
        staged_count = 0
        for bucket in plan:
            if self._stopping.is_set():
                raise RuntimeError("server stopping")
            self._before_bucket(session, bucket)
            slot = None
            if reader.needs_buffer(bucket):
                slot = staged_count % 2
                staged_count += 1
                if buffer_work[slot] is not None:
                    buffer_work[slot].complete(device, timeout_s)
            data = reader.read(bucket, buffers[slot] if slot is not None else None)
            work = session.pg.send([data], CLIENT_RANK, bucket_tag(bucket))
            send = _Send(work, data, f"sending bucket {bucket.index}")
            if slot is not None:
                buffer_work[slot] = send
            in_flight.append(send)
            while len(in_flight) > SEND_DEPTH:
                in_flight.popleft().complete(device, timeout_s)
        for send in in_flight:
            send.complete(device, timeout_s)

    def _before_bucket(self, session: _Session, bucket: Bucket) -> None:
        """Hook run before each bucket is read for sending (loader.distribution.relay waits here until
        the bucket is verified locally); raise to abort the session."""

    # ---- checksums (cached: the served tensors do not change) ------------------------

    def _precompute(self) -> None:
        try:
            device = device_for(self._device)
            device.enter_thread()
            self._plan_for(self.settings.bucket_bytes, device)
        except Exception:
            log.exception("netloader server rank %d: checksum precomputation failed", self.rank)
        finally:
            self._ready.set()

    def _plan_for(self, bucket_bytes: int, device: TransferDevice) -> ServedPlan:
        """Plan and keyed checksums for a bucket size, computed once per size (the sizes
        are the few that choose_bucket_bytes allows, so the cache is bounded). `device`
        is the calling thread's (entered) transfer device."""
        with self._plan_lock:
            cached = self._plans.get(bucket_bytes)
            if cached is not None:
                return cached
            plan = plan_buckets(self._manifest.specs, bucket_bytes)
            reader = BucketReader(self._tensors, device.copy, device.device)
            scratch = device.empty(reader.staging_bytes(plan))
            checksums = []
            for bucket in plan:
                data = reader.read(bucket, scratch)
                device.synchronize()  # packed before hashed, whatever stream the hash uses
                checksums.append(digest(data, self._algorithm, self._checksum_key))
            self._plans[bucket_bytes] = ServedPlan(plan, tuple(checksums))
            return self._plans[bucket_bytes]

    # ---- helpers ---------------------------------------------------------------------

    def _send(self, identity: bytes, msg: dict) -> None:
        """Queue a reply; only the control thread touches the ROUTER socket."""
        self._outbox.put((identity, protocol.encode(msg)))
        if threading.current_thread() is not self._thread:
            self._wake()

    def _flush_outbox(self) -> None:
        while True:
            try:
                identity, payload = self._outbox.get_nowait()
            except queue.Empty:
                return
            try:
                self._router.send_multipart([identity, payload], zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                log.debug("netloader server rank %d: reply dropped: %s", self.rank, exc)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass  # buffer full (a wakeup is already pending) or closed

    def _drain_wakeups(self) -> None:
        self._wake_r.setblocking(False)
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    def _bad_message(self, what: str) -> None:
        self.bad_messages += 1
        if self.bad_messages <= _BAD_MESSAGE_LOG_FIRST or self.bad_messages % 100 == 0:
            log.warning(
                "netloader server rank %d: bad message #%d: %s",
                self.rank,
                self.bad_messages,
                what[:200],
            )

    def _store_bind_host(self) -> str:
        return self._host or "0.0.0.0"

    def _advertised_host(self) -> str:
        if self.settings.advertise_host:
            return self.settings.advertise_host
        if self._host not in ("0.0.0.0", "::", ""):
            return self._host
        return outbound_ip()

    def _write_endpoint_file(self) -> None:
        path = f"{self._output_prefix}{self.rank}.txt"
        try:
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(self.endpoint + "\n")
        except OSError as exc:
            log.warning("netloader server rank %d: cannot write %s: %s", self.rank, path, exc)


def _peer_address(frame: zmq.Frame) -> str:
    try:
        return frame.get("Peer-Address") or ""
    except (zmq.ZMQError, AttributeError):
        return ""
