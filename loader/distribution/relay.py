"""Chained distribution: an instance that is still receiving serves what it has verified.

A `RelayServer` is a WeightServer over the destination tensors of a fetch in progress.
It is also the fetch's observer (see `fetch_from_sources(..., observer=)`):

- `transfer_started` gives it the upstream's plan and per-bucket keyed checksums.
  Those came over the authenticated control channel and originate at the root source; the relay hands exactly these to its own clients, so every hop verifies
  the root's checksums, never ones it computed from bytes it received.
- `bucket_verified` marks a bucket checked and written; only then may a downstream
  session read it (`_before_bucket` blocks until it is). Unverified bytes never leave.
- `attempt_failed` invalidates everything: downstream sessions are aborted (they fail
  that source and re-attach elsewhere), and the relay refuses new clients until the
  next upstream transfer starts. The fetch's next attempt overwrites the tensors only
  after the aborted sessions have stopped reading them.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Protocol

from loader.transfer.buckets import Bucket
from loader.transfer.process_group import destroy_group
from loader.transfer.protocol import NOT_RECEIVING
from loader.transfer.server import ServedPlan, WeightServer, choose_bucket_bytes

log = logging.getLogger(__name__)
__all__ = ["NOT_RECEIVING", "RelayServer", "TransferObserver"]

_SESSION_DRAIN_S = 10.0


class TransferObserver(Protocol):
    def transfer_started(self, source: str, ack, plan: list[Bucket]) -> None: ...
    def bucket_verified(self, source: str, index: int) -> None: ...
    def attempt_failed(self, source: str, reason: str) -> None: ...


class RelayServer(WeightServer):
    """Serve `tensors` while they are being fetched; see the module docstring.

    `tensors` must be the very dict passed to fetch_from_sources together with this
    relay as (part of) its observer. Call `fetch_succeeded()` once the fetch is done."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._relay = threading.Condition()
        self._relay_source: str | None = None
        self._relay_plan: list[Bucket] | None = None
        self._relay_checksums: tuple[str, ...] = ()
        self._relay_bucket_bytes = 0
        self._verified: list[bool] = []
        self._verified_bytes = 0
        self._generation = 0
        self._complete = False
        self._session_generation = threading.local()
        self.buckets_forwarded = 0

    # ---- observer side (called from the fetch) ---------------------------------------

    def transfer_started(self, source: str, ack, plan: list[Bucket]) -> None:
        with self._relay:
            if ack.algorithm != self._algorithm:
                log.warning("relay: upstream checksum algorithm %s unsupported", ack.algorithm)
                return
            self._relay_source = source
            self._relay_plan = list(plan)
            self._relay_checksums = tuple(ack.checksums)
            self._relay_bucket_bytes = ack.bucket_bytes
            self._verified = [False] * len(plan)
            self._verified_bytes = 0
            self._relay.notify_all()

    def bucket_verified(self, source: str, index: int) -> None:
        with self._relay:
            if source != self._relay_source or not 0 <= index < len(self._verified):
                return
            if not self._verified[index]:
                self._verified[index] = True
                self._verified_bytes += self._relay_plan[index].nbytes
                self._relay.notify_all()

    def attempt_failed(self, source: str, reason: str) -> None:
        self.invalidate(f"upstream {source} failed: {reason}")

    def fetch_succeeded(self) -> None:
        """Every tensor now holds its final value (fetched, or loaded from disk)."""
        with self._relay:
            self._complete = True
            self._relay.notify_all()
            have_checksums = self._relay_plan is not None
        if not have_checksums:  # filled from disk: compute checksums before a client asks
            threading.Thread(
                target=WeightServer._precompute,  # the relay's own override skips the work
                args=(self,),
                name=f"netloader-checksums-r{self.rank}",
                daemon=True,
            ).start()

    def invalidate(self, why: str) -> None:
        """Forget what was verified, abort downstream sessions and wait until they stop."""
        with self._relay:
            if self._complete:
                return
            self._generation += 1
            self._relay_source = None
            self._relay_plan = None
            self._verified = []
            self._verified_bytes = 0
            self._relay.notify_all()
        with self._sessions_lock:
            sessions = list(self._sessions.values())
        if sessions:
            log.info("relay: aborting %d downstream session(s): %s", len(sessions), why[:200])
        for s in sessions:
            s.done.set()
            destroy_group(s.pg)
        deadline = time.monotonic() + _SESSION_DRAIN_S
        for s in sessions:
            if s.thread is not None and s.thread is not threading.current_thread():
                s.thread.join(max(0.0, deadline - time.monotonic()))

    # ---- status for the gossip table -------------------------------------------------

    @property
    def state(self) -> str:
        """One of "complete", "receiving" (can serve verified buckets), "attaching"."""
        with self._relay:
            if self._complete:
                return "complete"
            return "receiving" if self._relay_plan is not None else "attaching"

    @property
    def upstream(self) -> str | None:
        """Endpoint of the source currently being received from (None when not receiving)."""
        with self._relay:
            return None if self._complete else self._relay_source

    @property
    def verified_fraction(self) -> float:
        with self._relay:
            if self._complete:
                return 1.0
            total = sum(b.nbytes for b in self._relay_plan or ())
            return self._verified_bytes / total if total else 0.0

    # ---- server side (WeightServer hooks) --------------------------------------------

    def _precompute(self) -> None:
        self._ready.set()  # checksums come from upstream; nothing to compute

    def _refusal_reason(self, hello) -> str | None:
        reason = super()._refusal_reason(hello)
        if reason:
            return reason
        with self._relay:
            if self._complete:
                return None
            if self._relay_plan is None:
                return NOT_RECEIVING
            wanted = choose_bucket_bytes(self.settings.bucket_bytes, hello.max_bucket_bytes)
            if wanted != self._relay_bucket_bytes:
                return f"relay forwards {self._relay_bucket_bytes}-byte buckets only"
        return None

    def _plan_for(self, bucket_bytes: int, device) -> ServedPlan:
        with self._relay:
            self._session_generation.value = self._generation
            if self._relay_plan is not None and bucket_bytes == self._relay_bucket_bytes:
                return ServedPlan(self._relay_plan, self._relay_checksums)
            complete = self._complete
        if complete:
            return super()._plan_for(bucket_bytes, device)
        raise RuntimeError(f"relay has no checksums for {bucket_bytes}-byte buckets")

    def _before_bucket(self, session, bucket: Bucket) -> None:
        generation = getattr(self._session_generation, "value", None)
        deadline = time.monotonic() + self.settings.bucket_timeout_s
        with self._relay:
            while True:
                if self._stopping.is_set():
                    raise RuntimeError("relay stopping")
                if self._generation != generation:
                    raise RuntimeError("relay's upstream failed; downstream must re-attach")
                if self._complete:
                    break  # every tensor is verified (whichever plan this session uses)
                if self._relay_plan is not None and self._verified[bucket.index]:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"bucket {bucket.index} not verified upstream in time")
                self._relay.wait(min(remaining, 0.5))
        self.buckets_forwarded += 1
