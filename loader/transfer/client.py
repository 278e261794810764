"""Client: fetch this rank's weights from the first source that can serve them.

For each source in order: TCP connect probe, authenticated handshake (fingerprint and
manifest compared by the source, manifest digest re-checked here), then a 2-rank process
group and bucketed receive, each bucket verified against the keyed checksum the source
sent over the control channel. Any failure is recorded as (source, reason) and the next
source is tried.

No unverified byte ever reaches the destination tensors: every bucket is received into
a staging slot private to the attempt, verified there, and only then copied into place,
through a WriteGate that the attempt closes before it returns (see receive_pipeline).
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass, field

import torch
import zmq

from loader.config import TransferSettings, parse_host_port
from loader.transfer import protocol
from loader.transfer.buckets import plan_buckets
from loader.transfer.checksum import checksum_key
from loader.transfer.device import WorkTimeout
from loader.transfer.liveness import SourceLiveness
from loader.transfer.manifest import Manifest, build_manifest, unique_tensors
from loader.transfer.process_group import backend_for_device
from loader.transfer.receive_pipeline import ChecksumMismatch, Destination, ReceivePipeline
from loader.transfer.resume import ResumeState, SourceFailure
from loader.transfer.watchdog import Interrupted, PhaseTimeout, Watchdog
from loader.transfer.write_gate import GateClosed
from mesh.addresses import join_host_port, zmq_endpoint
from mesh.security import close_context

log = logging.getLogger(__name__)


@dataclass
class FetchOutcome:
    ok: bool
    peer: str | None
    bytes: int
    seconds: float
    failures: list[tuple[str, str]] = field(default_factory=list)
    handshake_s: float = 0.0  # connect + hello/ack of the successful source
    setup_s: float = 0.0  # process-group setup of the successful source
    resumed_bytes: int = 0  # held verified from earlier attempts, not sent again
    peers: list[str] = field(default_factory=list)  # every source used (resharding: several)
    refusals: int = 0  # busy / not-receiving-yet answers on the way (mesh re-attach)

    @property
    def fallback_reason(self) -> str | None:
        return describe_failures(self.failures)


def describe_failures(failures: list[tuple[str, str]]) -> str | None:
    """`source: reason; source: reason`, or None when nothing failed."""
    if not failures:
        return None
    return "; ".join(f"{src}: {why}" for src, why in failures)


@dataclass
class FetchRequest:
    """What to fetch and how: the same for every source and stage of one rank's load.
    `tensors` are filled in place; `observer` (a relay) hears of every verified bucket;
    `resume` carries what was verified from one attempt to the next; `in_place`: see
    fetch_from_sources."""

    fingerprint: str
    tensors: dict[str, torch.Tensor]
    rank: int
    settings: TransferSettings
    keys: object = None
    observer: object = None
    resume: ResumeState = field(default_factory=lambda: ResumeState())
    in_place: bool = False

    def from_sources(self, sources: list[str]) -> FetchOutcome:
        return fetch_from_sources(
            sources, self.fingerprint, self.tensors, self.rank, self.settings,
            keys=self.keys, observer=self.observer, resume=self.resume, in_place=self.in_place,
        )


def fetch_from_sources(
    sources: list[str],
    fingerprint: str,
    tensors: dict[str, torch.Tensor],
    rank: int,
    settings: TransferSettings,
    keys=None,
    observer=None,
    resume: ResumeState | None = None,
    in_place: bool = False,
) -> FetchOutcome:
    """Fill `tensors` in place from the first source that serves matching weights.

    `tensors` are the destination tensors, already allocated with their final shapes and
    dtypes. The caller removes aliases (tied weights) first; names that still share
    storage are received once. On failure the tensors may be half-written: the caller
    must reload them (e.g. from disk); once this returns, no failed source can write into
    them any more. Never raises for a source's misbehaviour.

    `observer` (optional, see loader.distribution.relay.TransferObserver) is told when a source's
    transfer starts, each bucket once it is verified and written, and each failure.
    `resume` carries verified buckets across calls (one is made per call if not given):
    a later attempt only receives what is missing.

    `in_place=True` declares that nothing in `tensors` is relied on (served, used) beyond
    the buckets `resume` holds verified, as in a model just built: then, where the backend
    can be fenced (Gloo), direct buckets are received straight into their place and
    verified there, which saves a copy; their bytes count only once verified, and a failed
    source is fenced before this returns. Otherwise every bucket goes through staging
    memory, and a failed attempt leaves every byte of `tensors` as it was.
    """
    started = time.monotonic()
    resume = resume if resume is not None else ResumeState()
    failures: list[tuple[str, str]] = []
    if not sources:
        return FetchOutcome(False, None, 0, 0.0, failures)
    try:
        manifest = build_manifest(tensors)
        unique, _ = unique_tensors(tensors)
        scattered = [name for name, t in unique.items() if not t.is_contiguous()]
        if scattered:
            raise ValueError(f"destination tensor {scattered[0]} is not contiguous")
        context = zmq.Context()
    except Exception as exc:  # e.g. tensors without plain storage
        failures.append(("local", f"cannot prepare the transfer: {type(exc).__name__}: {exc}"))
        return FetchOutcome(False, None, 0, time.monotonic() - started, failures)
    try:
        for source in sources:
            attempt = _SourceAttempt(
                source, fingerprint, manifest, unique, rank, settings, keys, context,
                observer, resume, in_place,
            )
            reason = attempt.failure()
            if reason is None:
                return FetchOutcome(
                    True,
                    source,
                    manifest.total_bytes,
                    time.monotonic() - started,
                    failures,
                    handshake_s=attempt.handshake_s,
                    setup_s=attempt.setup_s,
                    resumed_bytes=attempt.resumed_bytes,
                )
            level = logging.DEBUG if protocol.is_retryable(reason) else logging.WARNING
            log.log(level, "netloader rank %d: source %s failed: %s", rank, source, reason)
            failures.append((source, reason))
            if observer is not None:
                observer.attempt_failed(source, reason)
    finally:
        close_context(context)
    return FetchOutcome(False, None, 0, time.monotonic() - started, failures)


class _SourceAttempt:
    def __init__(
        self, source, fingerprint, manifest, tensors, rank, settings, keys, context, observer,
        resume, in_place=False,
    ):
        self.source = source
        self.fingerprint = fingerprint
        self.manifest: Manifest = manifest
        self.tensors: dict[str, torch.Tensor] = tensors
        self.rank = rank
        self.settings: TransferSettings = settings
        self.keys = keys
        self.context: zmq.Context = context
        self.handshake_s = 0.0
        self.setup_s = 0.0
        self.resumed_bytes = 0
        self.observer = observer
        self.resume: ResumeState = resume
        self.in_place = in_place
        self.device = torch.device("cpu")  # the destination's, once the attempt runs

    def failure(self) -> str | None:
        """Run the attempt; the reason it failed, or None. Never raises."""
        try:
            self.run()
        except SourceFailure as exc:
            return str(exc)
        except Exception as exc:  # never let one source's failure escape
            log.debug(
                "netloader rank %d: unexpected error from %s", self.rank, self.source, exc_info=True
            )
            return f"unexpected {type(exc).__name__}: {str(exc)[:300]}"
        return None

    def run(self) -> None:
        devices = {t.device for t in self.tensors.values()} or {torch.device("cpu")}
        if len({d.type for d in devices}) != 1:
            raise SourceFailure(f"destination tensors span several device types: {devices}")
        self.device = next(iter(devices))
        try:
            host, port = parse_host_port("source", self.source)
        except ValueError as exc:
            raise SourceFailure(str(exc)) from None
        t0 = time.monotonic()
        probe_tcp(host, port, self.settings.connect_timeout_s)
        sock = open_control_socket(self.context, host, port, self.settings, self.keys)
        try:
            ack = self._handshake(sock)
            self.handshake_s = time.monotonic() - t0
            ok, reason = False, "client error"
            try:
                self._transfer(host, ack, sock)
                ok, reason = True, None
            except SourceFailure as exc:
                reason = str(exc)
                raise
            finally:
                try:
                    sock.send(
                        protocol.encode(protocol.done_message(ack.session, ok, reason)), zmq.NOBLOCK
                    )
                except zmq.ZMQError:
                    pass
        finally:
            sock.close(linger=200)

    def _plan_length(self, bucket_bytes: int) -> int:
        return len(plan_buckets(self.manifest.specs, bucket_bytes))

    def _hello(self) -> dict:
        return protocol.hello_message(
            self.fingerprint,
            self.rank,
            self.manifest,
            backend_for_device(self.device.type),
            self.settings.bucket_bytes,
            self.resume.offer(),
        )

    def _handshake(self, sock: zmq.Socket) -> protocol.Ack:
        timeout_s = self.settings.handshake_timeout_s
        deadline = time.monotonic() + timeout_s
        try:
            sock.send(protocol.encode(self._hello()))
        except zmq.Again:
            raise SourceFailure(
                f"handshake timed out after {timeout_s:g}s (no ZeroMQ session: the peer is "
                "not a netloader source, is hung, or rejected our cluster key)"
            ) from None
        remaining_ms = max(0, int((deadline - time.monotonic()) * 1000))
        if not sock.poll(remaining_ms, zmq.POLLIN):
            raise SourceFailure(f"handshake timed out after {timeout_s:g}s (no answer)")
        try:
            reply = protocol.parse_reply(
                protocol.decode(sock.recv(zmq.NOBLOCK), self.settings.max_message_bytes),
                self._plan_length,
            )
        except (protocol.ProtocolError, zmq.ZMQError) as exc:
            raise SourceFailure(f"bad reply: {exc}") from None
        if isinstance(reply, protocol.Refusal):
            raise SourceFailure(("busy: " if reply.busy else "refused: ") + reply.reason)
        if reply.manifest_digest != self.manifest.digest():
            raise SourceFailure("manifest mismatch: source acknowledged a different manifest")
        if reply.bucket_bytes > self.settings.bucket_bytes:
            raise SourceFailure(f"source chose {reply.bucket_bytes}-byte buckets, above our limit")
        return reply

    def _transfer(self, host: str, ack: protocol.Ack, sock: zmq.Socket) -> None:
        plan = plan_buckets(self.manifest.specs, ack.bucket_bytes)
        skip = self.resume.accept(ack)
        self.resumed_bytes = sum(plan[i].nbytes for i in skip)
        if skip:
            log.info(
                "netloader rank %d: resuming from %s: %d of %d buckets already verified",
                self.rank,
                self.source,
                len(skip),
                len(plan),
            )
        if self.observer is not None:
            self.observer.transfer_started(self.source, ack, plan)
            for index in sorted(skip):
                self.observer.bucket_verified(self.source, index)
        destination = Destination(
            self.tensors, self.device, self.resume, self.source, self.observer, self.in_place
        )
        receiver = ReceivePipeline(
            host,
            ack,
            [b for b in plan if b.index not in skip],
            destination,
            self.settings,
            checksum_key(self.keys),
            f"netloader rank {self.rank} from {self.source}",
        )
        try:
            Watchdog().run(
                receiver.run, on_timeout=receiver.abort, interrupt=SourceLiveness(
                    sock, ack, self.settings.ping_interval_s, self.settings.silence_timeout_s
                ).poll,
            )
        except (
            ChecksumMismatch, Interrupted, GateClosed, WorkTimeout, PhaseTimeout, RuntimeError
        ) as exc:
            raise SourceFailure(_failure_reason(exc)) from None
        finally:
            # before anything else: from here on this attempt publishes nothing, whatever
            # its abandoned threads or the backend still deliver; then the group is
            # fenced (gloo: its connections closed), so no receive can write again; at
            # once unless every receive posted on it has completed
            receiver.gate.close()
            self.setup_s = receiver.setup_s
            receiver.discard()
            receiver.device.synchronize()  # nothing of this attempt still queued on it


def probe_tcp(host: str, port: int, timeout_s: float) -> None:
    """A plain TCP connect, to tell 'refused' and 'unreachable' apart from a silent peer."""
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except ConnectionRefusedError:
        raise SourceFailure("connection refused") from None
    except TimeoutError:
        raise SourceFailure(f"connect timed out after {timeout_s:g}s") from None
    except OSError as exc:
        raise SourceFailure(f"connect failed: {exc.strerror or exc}") from None


def open_control_socket(
    context: zmq.Context, host: str, port: int, settings: TransferSettings, keys
) -> zmq.Socket:
    """A DEALER connected to a source's control channel (CURVE with `keys`)."""
    from mesh.security import secure_client

    sock = context.socket(zmq.DEALER)
    handshake_ms = int(settings.handshake_timeout_s * 1000)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, settings.max_message_bytes)
    sock.setsockopt(zmq.CONNECT_TIMEOUT, int(settings.connect_timeout_s * 1000))
    sock.setsockopt(zmq.HANDSHAKE_IVL, handshake_ms)
    sock.setsockopt(zmq.SNDTIMEO, handshake_ms)
    sock.setsockopt(zmq.IMMEDIATE, 1)  # queue only on completed connections
    if ":" in host:
        sock.setsockopt(zmq.IPV6, 1)
    secure_client(sock, keys)
    sock.connect(zmq_endpoint(join_host_port(host, port)))
    return sock


def _failure_reason(exc: Exception) -> str:
    if isinstance(exc, Interrupted):
        return f"source failed to set up the transfer: {exc}"
    if isinstance(exc, GateClosed):
        return "attempt abandoned"
    if isinstance(exc, (ChecksumMismatch, WorkTimeout, PhaseTimeout)):
        return str(exc)
    # torch.distributed errors: peer died, reset, timeout
    return f"transfer failed: {_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    """First line of a backend error, without gloo's leading "[source/file.cc:123] "."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    return text[:300]
