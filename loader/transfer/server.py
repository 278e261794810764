"""Weight server: serves one rank's tensors to clients that start after it.

A façade over its parts: the control channel (one thread owns the ZeroMQ ROUTER socket
and answers handshakes), admission (refusals, busy answers), the strategy (what is served
and when; by default fixed tensors, see serving_strategy), the plan and checksum cache
(served_plans) and the bucket sender. Each accepted client gets its own session thread
with its own 2-rank process group on a fresh port, so a slow transfer never blocks other
clients' handshakes. Nothing raises out of the threads: bad messages are counted and logged.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable

import torch
import zmq

from loader.config import TransferSettings
from loader.transfer import protocol
from loader.transfer.admission import Admission
from loader.transfer.bucket_sender import BucketSender
from loader.transfer.buckets import Bucket
from loader.transfer.cache_source import ServedCache, answer_cache_request
from loader.transfer.checksum import algorithm_for_device, checksum_key
from loader.transfer.control_channel import ControlChannel
from loader.transfer.device import TransferDevice, device_for
from loader.transfer.inference_yield import serving_cpus, yield_to_inference
from loader.transfer.layout import ShardLayout
from loader.transfer.liveness import CLIENT_SILENCE_FACTOR
from loader.transfer.manifest import build_manifest, unique_tensors
from loader.transfer.process_group import (
    SOURCE_RANK,
    backend_for_device,
    bind_store_socket,
    create_transfer_group,
    destroy_group,
    discard_group,
)
from loader.transfer.reshard_serving import ReshardServing
from loader.transfer.served_plans import ServedPlans, choose_bucket_bytes
from loader.transfer.serving_strategy import (
    FixedTensors,
    ServedSession,
    ServingStrategy,
    TransferState,
)
from loader.transfer.sessions import Session, Sessions, join_sessions
from mesh.addresses import WILDCARD_HOSTS, join_host_port, outbound_ip

log = logging.getLogger(__name__)

_BAD_MESSAGE_LOG_FIRST = 10


class WeightServer:
    """Serve `tensors` (this rank's raw weights) as `strategy` says (default: FixedTensors,
    the tensors must not change while served).

    `device` is the transfer device (the one the clients' tensors live on, whose backend
    moves the data); served tensors are on it or in host memory (copies kept only to be
    served), from where each bucket is staged onto the device. Default: the tensors' own.
    `admission()` may return a "busy" reason to refuse new sessions for now (e.g. while
    vLLM warms up). `sender_cls` builds the bucket sender (tests swap in faulty ones).

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
        strategy: ServingStrategy | None = None,
        sender_cls: type[BucketSender] = BucketSender,
        layout: ShardLayout | None = None,
    ) -> None:
        self._tensors, _ = unique_tensors(tensors)
        manifest = build_manifest(tensors)
        self._manifest = manifest
        self._manifest_digest = manifest.digest()
        self._device = _transfer_device(self._tensors, device)
        self.fingerprint = fingerprint
        self.rank = rank
        self.settings = settings
        self._keys = keys
        self._host = host
        self._port = port
        self._output_prefix = output_prefix
        self._admission = Admission(
            rank, fingerprint, backend_for_device(self._device.type), manifest, settings, self._device
        )
        self.plans = ServedPlans(
            self._tensors,
            manifest,
            self._device,
            algorithm_for_device(self._device.type),
            checksum_key(keys),
            rank,
        )
        self.sender = sender_cls(self._tensors, settings.bucket_timeout_s)
        self._sender_cls = sender_cls
        # clients of another shape (TP, PP, rank): `layout` describes this rank's shard
        self.reshard = ReshardServing(
            self._tensors, layout, backend_for_device(self._device.type), self.plans
        )
        self._sessions = Sessions()
        self._stopping = threading.Event()
        self._ready = threading.Event()
        self._channel = ControlChannel(
            self._on_message, settings.max_message_bytes, keys, f"netloader server rank {rank}",
            on_tick=self._end_silent_sessions,
        )
        self.bad_messages = 0
        self.admission: Callable[[], str | None] | None = None
        self.retained_bytes = 0  # bytes kept only to be served (reported in the mesh)
        self.compile_cache: ServedCache | None = None  # offered once vLLM has compiled
        self.endpoint: str | None = None
        self._serving_cpus: set[int] = set()  # where session threads run (start() finds them)
        # called (from any thread) whenever state, load or upstream may have changed:
        # the mesh presence advertises at once instead of at its next look
        self.on_status_change: Callable[[], None] | None = None
        self.strategy: ServingStrategy = strategy if strategy is not None else FixedTensors()
        self.strategy.attach(self)

    # ---- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        port = self._channel.bind(self._host, self._port)
        try:
            self.endpoint = join_host_port(self._advertised_host(), port)
            if self._output_prefix:
                self._write_endpoint_file()
            self._serving_cpus = serving_cpus()  # workers are pinned by now (vLLM's init_device)
            self._channel.start(f"netloader-server-r{self.rank}")
        except BaseException:
            self._channel.close(0)
            raise
        threading.Thread(
            target=self._prepare, name=f"netloader-checksums-r{self.rank}", daemon=True
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

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def wait_ready(self, timeout_s: float | None = None) -> bool:
        """True once the strategy prepared (by default: checksums for the default bucket
        size are cached)."""
        return self._ready.wait(timeout_s)

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stopping.set()
        self._channel.stop()
        join_sessions(self._sessions.abort_all(), timeout_s, each=True)
        self._channel.close(timeout_s)

    def abort_sessions(self, why: str, drain_s: float) -> None:
        """End every running session (their clients see the transfer fail) and wait up to
        `drain_s` for them to stop reading the tensors."""
        sessions = self._sessions.abort_all()
        if sessions:
            log.info(
                "netloader server rank %d: aborted %d session(s): %s", self.rank, len(sessions), why[:200]
            )
        join_sessions(sessions, drain_s)

    @property
    def active_clients(self) -> int:
        return len(self._sessions)

    # ---- status, from the strategy ---------------------------------------------------

    def status_changed(self) -> None:
        listener = self.on_status_change
        if listener is not None:
            listener()

    @property
    def state(self) -> TransferState:
        return self.strategy.state

    @property
    def upstream(self) -> str | None:
        return self.strategy.upstream

    @property
    def verified_fraction(self) -> float:
        return self.strategy.verified_fraction

    # ---- control messages ------------------------------------------------------------

    def _on_message(self, frames: list[zmq.Frame]) -> None:
        if len(frames) != 2:
            self._bad_message(f"{len(frames)} frames")
            return
        identity, payload = frames[0].bytes, frames[1].bytes
        try:
            msg = protocol.decode(payload, self.settings.max_message_bytes)
            if msg["type"] == "hello":
                self._on_hello(identity, protocol.parse_hello(msg), _peer_address(frames[1]))
            elif msg["type"] == "done":
                self._on_done(identity, protocol.parse_done(msg))
            elif msg["type"] == "ping":
                self._on_ping(identity, protocol.parse_ping(msg))
            elif msg["type"] == "layout":
                self._channel.reply(identity, self.reshard.describe(msg))
            elif msg["type"] in ("cache_get", "cache_read", "modelinfo_get"):
                reply, data = answer_cache_request(self.compile_cache, msg, self._keys is not None)
                self._channel.reply(identity, reply, data)
            else:
                raise protocol.ProtocolError(f"unexpected message type {msg['type'][:40]!r}")
        except protocol.ProtocolError as exc:
            self._bad_message(str(exc))
            self._channel.reply(identity, protocol.nack_message(f"bad request: {exc}"))

    def _on_hello(self, identity: bytes, hello: protocol.Hello, peer_address: str) -> None:
        bucket_bytes = choose_bucket_bytes(self.settings.bucket_bytes, hello.max_bucket_bytes)
        pieces = None
        if hello.reshard is not None:  # a client of another shape: only complete tensors
            reason, pieces = self.reshard.admit(hello, self.strategy.state is TransferState.COMPLETE)
        else:
            reason = self._admission.refusal(hello) or self.strategy.refusal(hello, bucket_bytes)
        if reason is None and bucket_bytes is None:
            reason = f"client buckets of at most {hello.max_bucket_bytes} bytes are below 1 MiB"
        if reason:
            log.info("netloader server rank %d: refused a client: %s", self.rank, reason)
            self._channel.reply(identity, protocol.nack_message(reason))
            return
        session = Session(secrets.token_hex(16), identity, hello, bucket_bytes, peer_address, pieces=pieces)
        busy = self._sessions.admit(
            session,
            lambda running: self._admission.busy(running, peer_address, bucket_bytes, self.admission),
        )
        if busy:
            self._channel.reply(identity, protocol.nack_message(busy, busy=True))
            return
        self.status_changed()  # one more client: the load others see
        session.thread = threading.Thread(
            target=self._serve_session,
            args=(session,),
            name=f"netloader-session-r{self.rank}-{session.session_id}",
            daemon=True,
        )
        session.thread.start()

    def _on_ping(self, identity: bytes, session_id: str) -> None:
        if self._sessions.heard_from(session_id, time.monotonic()):
            reply = protocol.pong_message(session_id)
        else:
            reply = protocol.abort_message(session_id, "the source holds no such session")
        self._channel.reply(identity, reply)

    def _end_silent_sessions(self) -> None:
        """A client that pinged and fell silent is gone (crashed, or cut off): end its
        session now rather than at the bucket timeout, so its slot serves someone else."""
        timeout_s = CLIENT_SILENCE_FACTOR * self.settings.silence_timeout_s
        for session in self._sessions.silent(time.monotonic(), timeout_s):
            log.warning(
                "netloader server rank %d: client of session %s silent for %gs: ending it",
                self.rank, session.session_id, timeout_s,
            )
            session.done.set()
            destroy_group(session.pg)

    def _on_done(self, identity: bytes, done: protocol.Done) -> None:
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

    # ---- one client's transfer -------------------------------------------------------

    def _serve_session(self, session: Session) -> None:
        store_socket = None
        started = time.monotonic()
        device = device_for(self._device)
        yield_to_inference(self._serving_cpus)  # before the group: its I/O threads inherit this
        try:
            device.enter_thread()  # this thread's device, and a stream of its own
            served, sender = self._open_session(session, device)
            plan = served.plan.buckets
            resume = session.hello.resume
            skip = frozenset()
            if resume is not None and resume.bucket_bytes == session.bucket_bytes:
                skip = resume.indices(len(plan))  # the client verified these already
            store_socket = bind_store_socket(self._store_bind_host())
            store_port = store_socket.getsockname()[1]
            self._acknowledge(session, served, store_port, skip, device)
            session.pg = create_transfer_group(
                self._device.type,
                self._store_bind_host(),
                store_port,
                SOURCE_RANK,
                session.session_id,
                self.settings.pg_setup_timeout_s,
                self.settings.bucket_timeout_s,
                listen_socket=store_socket,
                streams=self._streams(),
            )
            store_socket = None  # owned by the TCPStore now
            self._sessions.mark_group_up(session)
            to_send = [b for b in plan if b.index not in skip]
            self._send_buckets(session, served, to_send, device, sender)
            self._await_done(session)
            log.info(
                "netloader server rank %d: sent %.2f GiB to a client in %.2fs%s",
                self.rank,
                sum(b.nbytes for b in to_send) / (1 << 30),
                time.monotonic() - started,
                f" (resumed: {len(skip)} of {len(plan)} buckets held already)" if skip else "",
            )
        except Exception as exc:
            self._session_failed(session, exc)
        finally:
            if store_socket is not None:
                store_socket.close()
            discard_group(session)
            device.synchronize()  # after an abort too: nothing of the session still queued
            self._sessions.remove(session)
            self.status_changed()

    def _acknowledge(
        self,
        session: Session,
        served: ServedSession,
        store_port: int,
        skip: frozenset[int],
        device: TransferDevice,
    ) -> None:
        ack = protocol.Ack(
            session=session.session_id,
            store_port=store_port,
            bucket_bytes=session.bucket_bytes,
            algorithm=served.plan.algorithm,
            checksums=served.plan.checksums,
            manifest_digest=(
                session.pieces.manifest.digest() if session.pieces else self._manifest_digest
            ),
            skip=skip,
            streams=self._streams(),
            ping=True,
            items=item_messages(device),
        )
        self._channel.reply(session.identity, protocol.ack_message(ack))

    def _streams(self) -> int:
        return self.settings.streams if backend_for_device(self._device.type) == "gloo" else 1

    def _open_session(self, session: Session, device: TransferDevice):
        """(plan, sender) of a session: the strategy's, or the requested pieces'."""
        if session.pieces is None:
            return self.strategy.open_session(session.bucket_bytes, device), self.sender
        plan = self.reshard.plan_for(session.pieces, session.bucket_bytes, device)
        sender = self._sender_cls(session.pieces.tensors, self.settings.bucket_timeout_s)
        return ServedSession(plan), sender

    def _send_buckets(
        self, session: Session, served: ServedSession, buckets: list[Bucket], device: TransferDevice,
        sender: BucketSender,
    ) -> None:
        def before_bucket(bucket: Bucket) -> None:
            if self._stopping.is_set():
                raise RuntimeError("server stopping")
            if session.pieces is None:  # complete tensors need no wait
                self.strategy.before_bucket(served, bucket)

        sender.send(session.pg, buckets, device, before_bucket, item_messages=item_messages(device))

    def _await_done(self, session: Session) -> None:
        if not session.done.wait(self.settings.bucket_timeout_s):
            raise TimeoutError("client did not confirm the transfer")
        done = session.done_message
        if done is None or not done.ok:
            raise RuntimeError(f"client reported failure: {done.reason if done else 'stopped'}")

    def _session_failed(self, session: Session, exc: Exception) -> None:
        if self._stopping.is_set():
            return
        why = f"{type(exc).__name__}: {str(exc)[:300]}"
        if not session.group_up:
            # the client is still setting up: tell it now, not after pg_setup_timeout_s
            self._channel.reply(session.identity, protocol.abort_message(session.session_id, why))
        log.warning(
            "netloader server rank %d: transfer %s failed: %s", self.rank, session.session_id, why
        )

    # ---- helpers ---------------------------------------------------------------------

    def _prepare(self) -> None:
        try:
            self.strategy.prepare()
        except Exception:
            log.exception("netloader server rank %d: serving strategy failed to prepare", self.rank)
        finally:
            self._ready.set()

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
        if self._host not in WILDCARD_HOSTS:
            return self._host
        return outbound_ip()

    def _write_endpoint_file(self) -> None:
        path = f"{self._output_prefix}{self.rank}.txt"
        try:
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(self.endpoint + "\n")
        except OSError as exc:
            log.warning("netloader server rank %d: cannot write %s: %s", self.rank, path, exc)


def _transfer_device(tensors: dict[str, torch.Tensor], device: torch.device | None) -> torch.device:
    """The device clients' tensors move through: `device`, or the tensors' own; with the
    index the tensors were allocated with (a bare "cuda" means another device in a worker
    whose local rank is not 0)."""
    if device is None:
        devices = {t.device for t in tensors.values()} or {torch.device("cpu")}
        if len({d.type for d in devices}) != 1:
            raise ValueError(f"tensors span several device types: {sorted(map(str, devices))}")
        device = next(iter(devices))
    stray = {t.device.type for t in tensors.values()} - {device.type, "cpu"}
    if stray:
        raise ValueError(f"tensors on {sorted(stray)} cannot be served from {device}")
    return next((t.device for t in tensors.values() if t.device.type == device.type), device)


def _peer_address(frame: zmq.Frame) -> str:
    try:
        return frame.get("Peer-Address") or ""
    except (zmq.ZMQError, AttributeError):
        return ""


def item_messages(device: TransferDevice) -> bool:
    """Whether packed buckets travel as one message per item: on the host (Gloo), where
    packing costs a CPU copy of each such byte on each side. Not on accelerators: there
    packing is a device copy, cheaper than one more point-to-point operation per tensor."""
    return not device.is_async
