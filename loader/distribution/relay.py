"""Chained distribution: an instance that is still receiving serves what it has verified.

A `Relay` is the serving strategy of a WeightServer over the destination tensors of a
fetch in progress (`relay_server` builds one). It is also the fetch's observer (see
`fetch_from_sources(..., observer=)`):

- `transfer_started` gives it the upstream's plan and per-bucket keyed checksums.
  Those came over the authenticated control channel and originate at the root source;
  the relay hands exactly these to its own clients, so every hop verifies the root's
  checksums, never ones it computed from bytes it received.
- `bucket_verified` marks a bucket checked and written; only then may a downstream
  session read it (`before_bucket` blocks until it is). Unverified bytes never leave.
- `attempt_failed` does not stop the downstream sessions: they wait (at most
  `relay_failover_s`) for the fetch's next attempt. If that attempt resumes the same
  transfer (the same plan and checksums, and it skips every bucket verified here, so it
  writes only into buckets no session may read yet), they go on as if nothing happened:
  a dead hop costs the chain below it one re-attach, not one per hop. Any other attempt
  `invalidate`s first: downstream sessions are aborted (they fail that source and
  re-attach elsewhere) and the tensors are overwritten only once they stopped reading.
  While no upstream sends, the relay refuses new clients. The caller invalidates before
  it fills the tensors otherwise (resharding, disk).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Protocol

import torch

from loader.config import TransferSettings
from loader.transfer.buckets import Bucket
from loader.transfer.protocol import NOT_RECEIVING
from loader.transfer.served_plans import ServedPlan
from loader.transfer.server import WeightServer
from loader.transfer.serving_strategy import ServedSession, TransferState

log = logging.getLogger(__name__)
__all__ = ["NOT_RECEIVING", "Relay", "TransferObserver", "relay_server"]

_SESSION_DRAIN_S = 10.0
_WAIT_SLICE_S = 0.5


class TransferObserver(Protocol):
    def transfer_started(self, source: str, ack, plan: list[Bucket]) -> None: ...
    def bucket_verified(self, source: str, index: int) -> None: ...
    def attempt_failed(self, source: str, reason: str) -> None: ...


def relay_server(
    tensors: dict[str, torch.Tensor],
    fingerprint: str,
    rank: int,
    settings: TransferSettings,
    relay: Relay | None = None,
    **options,
) -> WeightServer:
    """A WeightServer serving `tensors` while they are being fetched; its strategy (the
    relay, `server.strategy`) is the fetch's observer. `tensors` must be the very dict
    passed to fetch_from_sources with the relay as (part of) its observer."""
    return WeightServer(
        tensors, fingerprint, rank, settings, strategy=relay or Relay(), **options
    )


@dataclass(eq=False)
class RelaySession(ServedSession):
    generation: int = 0  # the upstream attempt the session's plan came from


class Relay:
    """Serve tensors while they are fetched; see the module docstring. Call
    `fetch_succeeded()` once the fetch is done (or the tensors were loaded otherwise)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._source: str | None = None
        self._plan: list[Bucket] | None = None
        self._checksums: tuple[str, ...] = ()
        self._algorithm = ""
        self._bucket_bytes = 0
        self._verified: list[bool] = []
        self._verified_bytes = 0
        self._generation = 0
        self._orphaned_since: float | None = None  # upstream failed, the next not yet started
        self._complete = False
        self._server: WeightServer | None = None
        self.buckets_forwarded = 0

    def attach(self, server: WeightServer) -> None:
        if self._server is not None:
            raise RuntimeError("a relay serves for one server only")
        self._server = server

    # ---- observer side (called from the fetch) ---------------------------------------

    def transfer_started(self, source: str, ack, plan: list[Bucket]) -> None:
        with self._cond:
            if self._continues(ack, plan):
                self._source, self._orphaned_since = source, None
                self._cond.notify_all()
                resumed = True
            else:
                resumed = False
                stale = self._plan is not None
        if resumed:
            log.info(
                "netloader relay: %s resumes the transfer; %d downstream session(s) go on",
                source, self._server.active_clients if self._server else 0,
            )
        else:
            if stale:  # another plan or other checksums: downstreams must not read on
                self.invalidate(f"upstream {source} sends another transfer")
            with self._cond:
                self._source = source
                self._plan = list(plan)
                self._checksums = tuple(ack.checksums)
                self._algorithm = ack.algorithm  # passed on as the upstream announced it
                self._bucket_bytes = ack.bucket_bytes
                self._verified = [False] * len(plan)
                self._verified_bytes = 0
                self._cond.notify_all()
        self._status_changed()  # receiving: downstreams may attach now

    def _continues(self, ack, plan: list[Bucket]) -> bool:
        """Whether an attempt announcing `ack` and `plan` resumes the transfer sessions
        are reading: then it writes only into buckets not verified here (lock held)."""
        if self._plan is None or self._complete:
            return False
        verified = {i for i, done in enumerate(self._verified) if done}
        return (
            plan == self._plan
            and tuple(ack.checksums) == self._checksums
            and ack.algorithm == self._algorithm
            and ack.bucket_bytes == self._bucket_bytes
            and verified <= set(ack.skip)
        )

    def bucket_verified(self, source: str, index: int) -> None:
        with self._cond:
            if source != self._source or not 0 <= index < len(self._verified):
                return
            if not self._verified[index]:
                self._verified[index] = True
                self._verified_bytes += self._plan[index].nbytes
                self._cond.notify_all()

    def attempt_failed(self, source: str, reason: str) -> None:
        """Keep the downstream sessions for the next attempt (see the module docstring)."""
        with self._cond:
            if self._complete or source != self._source:
                return
            self._source = None
            self._orphaned_since = time.monotonic()
            self._cond.notify_all()
        log.info(
            "netloader relay: upstream %s failed (%s); downstream sessions wait up to %gs "
            "for the next upstream to resume", source, reason, self._failover_s,
        )
        self._status_changed()

    def fetch_succeeded(self) -> None:
        """Every tensor now holds its final value (fetched, or loaded from disk)."""
        with self._cond:
            self._complete = True
            self._cond.notify_all()
            have_checksums = self._plan is not None
        self._status_changed()
        if not have_checksums:  # filled from disk: compute checksums before a client asks
            server = self._server
            threading.Thread(
                target=server.plans.precompute,
                args=(server.settings.bucket_bytes,),
                name=f"netloader-checksums-r{server.rank}",
                daemon=True,
            ).start()

    def invalidate(self, why: str) -> None:
        """Forget what was verified, abort downstream sessions and wait until they stop."""
        with self._cond:
            if self._complete:
                return
            self._generation += 1
            self._source = None
            self._orphaned_since = None
            self._plan = None
            self._verified = []
            self._verified_bytes = 0
            self._cond.notify_all()
        self._status_changed()
        self._server.abort_sessions(f"relay: {why}", _SESSION_DRAIN_S)

    # ---- status for the gossip table -------------------------------------------------

    @property
    def _failover_s(self) -> float:
        return self._server.settings.relay_failover_s if self._server else 0.0

    def _receiving(self) -> bool:
        """An upstream is sending (lock held)."""
        return self._plan is not None and self._orphaned_since is None

    def _status_changed(self) -> None:
        if self._server is not None:
            self._server.status_changed()

    @property
    def state(self) -> TransferState:
        """COMPLETE, RECEIVING (can serve verified buckets) or ATTACHING (also while
        waiting for the next upstream: not offered as a source meanwhile)."""
        with self._cond:
            if self._complete:
                return TransferState.COMPLETE
            return TransferState.RECEIVING if self._receiving() else TransferState.ATTACHING

    @property
    def upstream(self) -> str | None:
        """Endpoint of the source currently being received from (None when not receiving)."""
        with self._cond:
            return None if self._complete else self._source

    @property
    def verified_fraction(self) -> float:
        with self._cond:
            if self._complete:
                return 1.0
            total = sum(b.nbytes for b in self._plan or ())
            return self._verified_bytes / total if total else 0.0

    # ---- serving strategy (called by the server) -------------------------------------

    def prepare(self) -> None:
        """Nothing to compute: checksums come from upstream (or once the fetch is done)."""

    def refusal(self, hello, bucket_bytes: int | None) -> str | None:
        with self._cond:
            if self._complete:
                return None
            if not self._receiving():
                return NOT_RECEIVING
            if bucket_bytes != self._bucket_bytes:
                return f"relay forwards {self._bucket_bytes}-byte buckets only"
        return None

    def open_session(self, bucket_bytes: int, device) -> RelaySession:
        with self._cond:
            generation = self._generation
            if self._plan is not None and bucket_bytes == self._bucket_bytes:
                return RelaySession(
                    ServedPlan(self._plan, self._checksums, self._algorithm), generation
                )
            complete = self._complete
        if complete:
            return RelaySession(self._server.plans.plan_for(bucket_bytes, device), generation)
        raise RuntimeError(f"relay has no checksums for {bucket_bytes}-byte buckets")

    def before_bucket(self, session: RelaySession, bucket: Bucket) -> None:
        """Block until `bucket` is verified here (bounded by bucket_timeout_s)."""
        deadline = time.monotonic() + self._server.settings.bucket_timeout_s
        with self._cond:
            while True:
                if self._server.stopping:
                    raise RuntimeError("relay stopping")
                if self._generation != session.generation:
                    raise RuntimeError("relay's transfer was invalidated; downstream must re-attach")
                if self._complete:
                    break  # every tensor is verified (whichever plan this session uses)
                if self._plan is not None and self._verified[bucket.index]:
                    break
                now = time.monotonic()
                if self._orphaned_since is not None and now - self._orphaned_since > self._failover_s:
                    raise RuntimeError(
                        f"relay's upstream failed and none resumed within {self._failover_s:g}s; "
                        "downstream must re-attach"
                    )
                remaining = deadline - now
                if remaining <= 0:
                    raise TimeoutError(f"bucket {bucket.index} not verified upstream in time")
                self._cond.wait(min(remaining, _WAIT_SLICE_S))
        self.buckets_forwarded += 1
