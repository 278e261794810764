"""Client side of resharding: fill this rank's shard from source ranks of another shape.

1. Ask candidate sources, best first, for their ShardLayout until together they cover
   this rank's shard (loader.transfer.reshard_plan decides who sends what: each byte
   this rank keeps is asked of exactly one source, nothing more).
2. From each source, one transfer of exactly those slices, as any transfer: an
   authenticated hello naming them, the source's keyed checksums over them, received
   into staging, verified, and only then written into place through the attempt's
   WriteGate (receive_pipeline; strided slices are written run by run).
3. A source that fails is dropped and what it owed is planned again over the others
   (asking further candidates if needed); when nothing covers the rest, the caller
   falls back to disk.
"""

from __future__ import annotations

import logging
import time

import torch
import zmq

from loader.config import TransferSettings, parse_host_port
from loader.transfer import protocol
from loader.transfer.client import (
    FetchOutcome,
    _SourceAttempt,
    open_control_socket,
    probe_tcp,
)
from loader.transfer.layout import ShardLayout
from loader.transfer.manifest import build_manifest
from loader.transfer.pieces import piece_views
from loader.transfer.process_group import backend_for_device
from loader.transfer.reshard_plan import SliceRequest, client_needs, plan_reshard, remaining_needs
from loader.transfer.reshard_protocol import layout_query_message, parse_layout_reply
from loader.transfer.resume import ResumeState, SourceFailure
from mesh.security import close_context

log = logging.getLogger(__name__)


class _ReshardAttempt(_SourceAttempt):
    """One source's part: a normal attempt whose manifest lists the requested slices."""

    def __init__(self, source, layout: ShardLayout, requests, views, rank, settings, keys, context):
        super().__init__(
            source, layout.content, build_manifest(views), views, rank, settings, keys, context,
            None, ResumeState(),
        )
        self.requests = requests

    def _hello(self) -> dict:
        return protocol.hello_message(
            self.fingerprint, self.rank, self.manifest, backend_for_device(self.device.type),
            self.settings.bucket_bytes, None, reshard=self.requests,
        )

    def describe(self) -> ShardLayout:
        """The source's layout (SourceFailure when it cannot or will not say)."""
        try:
            host, port = parse_host_port("source", self.source)
        except ValueError as exc:
            raise SourceFailure(str(exc)) from None
        probe_tcp(host, port, self.settings.connect_timeout_s)
        sock = open_control_socket(self.context, host, port, self.settings, self.keys)
        timeout_s = self.settings.handshake_timeout_s
        try:
            try:
                sock.send(protocol.encode(layout_query_message(self.fingerprint)))
            except zmq.Again:
                raise SourceFailure(f"layout query timed out after {timeout_s:g}s") from None
            if not sock.poll(int(timeout_s * 1000), zmq.POLLIN):
                raise SourceFailure(f"layout query timed out after {timeout_s:g}s (no answer)")
            try:
                reply = parse_layout_reply(
                    protocol.decode(sock.recv(zmq.NOBLOCK), self.settings.max_message_bytes)
                )
            except (protocol.ProtocolError, zmq.ZMQError) as exc:
                raise SourceFailure(f"bad layout reply: {exc}") from None
        finally:
            sock.close(linger=0)
        if isinstance(reply, protocol.Refusal):
            raise SourceFailure(("busy: " if reply.busy else "refused: ") + reply.reason)
        if reply.content != self.fingerprint:
            raise SourceFailure("layout of other weights (content id differs)")
        return reply


def fetch_resharded(
    sources: list[str],
    layout: ShardLayout,
    tensors: dict[str, torch.Tensor],
    rank: int,
    settings: TransferSettings,
    keys=None,
) -> FetchOutcome:
    """Fill `tensors` (this rank's, described by `layout`) from `sources` of any shape.
    As fetch_from_sources: never raises for a source's misbehaviour; on failure the
    tensors may be half-written and the caller reloads them."""
    started = time.monotonic()
    failures: list[tuple[str, str]] = []
    if layout.unsupported:
        name, why = layout.unsupported[0]
        more = f" (and {len(layout.unsupported) - 1} more)" if len(layout.unsupported) > 1 else ""
        failures.append(("reshard", f"cannot reshard {name}: {why}{more}"))
        return FetchOutcome(False, None, 0, 0.0, failures)
    run = _Reshard(layout, tensors, rank, settings, keys, failures)
    try:
        ok = run.fill(list(dict.fromkeys(sources)))
    except Exception as exc:  # never let a planning or local error escape: disk follows
        log.debug("netloader rank %d: resharding failed", rank, exc_info=True)
        failures.append(("reshard", f"unexpected {type(exc).__name__}: {str(exc)[:300]}"))
        ok = False
    finally:
        close_context(run.context)
    seconds = time.monotonic() - started
    if not ok:
        return FetchOutcome(False, None, 0, seconds, failures)
    return FetchOutcome(True, run.used[0], run.nbytes, seconds, failures, peers=run.used)


class _Reshard:
    def __init__(self, layout, tensors, rank, settings, keys, failures) -> None:
        self.layout = layout
        self.tensors = tensors
        self.rank = rank
        self.settings = settings
        self.keys = keys
        self.failures = failures
        self.context = zmq.Context()
        self.used: list[str] = []
        self.nbytes = 0

    def _attempt(self, source: str, requests=(), views=None) -> _ReshardAttempt:
        return _ReshardAttempt(
            source, self.layout, list(requests), views or {}, self.rank, self.settings, self.keys,
            self.context,
        )

    def fill(self, queue: list[str]) -> bool:
        everything = client_needs(self.layout)
        needs, received = everything, []
        known: list[tuple[str, ShardLayout]] = []
        while needs:
            plan = plan_reshard(self.layout, needs, known)
            while not plan.complete and queue:
                source = queue.pop(0)
                try:
                    known.append((source, self._attempt(source).describe()))
                except SourceFailure as exc:
                    self.failures.append((source, str(exc)))
                    continue
                plan = plan_reshard(self.layout, needs, known)
            if not plan.complete:
                name, why = plan.missing[0]
                more = f" (and {len(plan.missing) - 1} more)" if len(plan.missing) > 1 else ""
                self.failures.append(("reshard", f"no source holds all of {name}: {why}{more}"))
                return False
            for source, requests in plan.requests.items():
                if not self._receive(source, requests, known):
                    known = [(s, lay) for s, lay in known if s != source]
                    break
                received.extend(requests)
            needs = remaining_needs(everything, received)
        return True

    def _receive(self, source: str, requests: list[SliceRequest], known) -> bool:
        views = piece_views(self.tensors, requests, at_source=False)
        nbytes = sum(v.numel() * v.element_size() for v in views.values())
        theirs = next(lay for s, lay in known if s == source)
        log.info(
            "netloader rank %d: resharding %.1f MiB in %d slices from %s (tp %d, pp %d, rank %d)",
            self.rank, nbytes / (1 << 20), len(requests), source, theirs.tp, theirs.pp, theirs.rank,
        )
        reason = self._attempt(source, requests, views).failure()
        if reason is not None:
            log.warning("netloader rank %d: resharding source %s failed: %s", self.rank, source, reason)
            self.failures.append((source, reason))
            return False
        if source not in self.used:
            self.used.append(source)
        self.nbytes += nbytes
        return True
