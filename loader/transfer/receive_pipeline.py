"""One attempt's data path on the client: the process group, then each bucket received
into memory private to the attempt, verified there (in a helper thread, while the next
ones arrive) and only then published into the destination through the attempt's
WriteGate. A failed source may go on sending (a backend cannot cancel a posted receive),
but nothing it sends can reach live weights:

- staged buckets (packed ones, and every bucket on accelerators) land in staging buffers
  nobody reads again, and are copied into the destination tensors once verified;
- when the caller relies on nothing in the destination but what its resume state holds
  verified (a model just built: Destination.in_place) and the backend can be fenced
  (Gloo, see TransferDevice.receives_in_place), a direct bucket, one piece of one
  tensor, is received straight into its place, and so is a packed bucket the source
  sends as one message per item (ack.items), each item into its tensor and verified
  there (checksum.digest_pieces): until its checksum matched such a bucket is no weight
  (nothing is told of it, nothing reads it, resume does not hold it), and when the
  attempt ends its group is fenced before anything else runs, so no receive of it can
  write again. This saves the copy of every byte of a model.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from loader.config import TransferSettings
from loader.transfer import protocol
from loader.transfer.buckets import (
    Bucket,
    bucket_tag,
    byte_view,
    max_bucket_bytes,
    message_spans,
    unpack_bucket,
)
from loader.transfer.checksum import GATHERED, digest, digest_pieces, warm_up
from loader.transfer.device import TransferDevice, await_work, device_for
from loader.transfer.process_group import (
    CLIENT_RANK,
    SOURCE_RANK,
    create_transfer_group,
    destroy_group,
    discard_group,
    wait_for_store,
)
from loader.transfer.progress import ProgressReporter
from loader.transfer.resume import ResumeState
from loader.transfer.watchdog import Watchdog
from loader.transfer.write_gate import WriteGate

log = logging.getLogger(__name__)

RECV_DEPTH = 4  # receives posted ahead of the one being verified
# staging buffers when most buckets are received in place (only the packed ones are
# staged): fresh host memory costs page faults (the kernel zeroes every page) and
# verification keeps up, so two are enough; otherwise one per receive posted ahead
IN_PLACE_STAGING_DEPTH = 2


class ChecksumMismatch(Exception):
    """A received bucket does not match the checksum the source announced."""


@dataclass(frozen=True)
class Destination:
    """Where verified buckets land: the destination tensors (on `device`), the resume
    state that remembers each one and the observer (a relay) told of it. `in_place`: the
    caller relies on nothing in the tensors beyond what `resume` holds verified (see
    client.fetch_from_sources), so direct buckets may be received into their place."""

    tensors: dict[str, torch.Tensor]
    device: torch.device
    resume: ResumeState
    source: str
    observer: object = None
    in_place: bool = False

    def places_of(self, bucket: Bucket) -> list[torch.Tensor]:
        """The destination bytes of each of a bucket's items (contiguous tensors)."""
        return [
            byte_view(self.tensors[item.name])[item.tensor_offset : item.tensor_offset + item.nbytes]
            for item in bucket.items
        ]

    def write(
        self, bucket: Bucket, data: torch.Tensor, checksum: str, device: TransferDevice, in_place: bool
    ) -> None:
        """Publish a verified bucket: copy it into place unless it was received there."""
        self.resume.forget(bucket.index)
        if not in_place:
            unpack_bucket(bucket, data, self.tensors, device.copy)
        device.synchronize()  # the bytes are in place before anyone is told
        self.resume.record(bucket.index, checksum)
        if self.observer is not None:
            self.observer.bucket_verified(self.source, bucket.index)


@dataclass
class _Posted:
    bucket: Bucket
    works: list  # one receive per message (buckets.message_spans)
    targets: list[torch.Tensor]  # where each message lands: staging memory or its place
    whole: torch.Tensor | None  # the bucket's bytes end to end, when they are (not for
    # a packed bucket received in its tensors' places)
    slot: int
    in_place: bool
    staging: int | None  # the staging buffer's index


class _ReceiveRing:
    """The receives posted ahead: bucket i uses slot i % depth (its verification), the
    k-th staged bucket staging buffer k % staging depth, and a slot or buffer is used
    again only once the bucket that used it last was verified and published."""

    def __init__(
        self, plan: list[Bucket], destination: Destination, device: TransferDevice, ack: protocol.Ack
    ) -> None:
        self.plan = plan
        self.destination = destination
        self.in_place = destination.in_place and device.receives_in_place
        self.item_messages = ack.items
        self.packed_in_place = self.in_place and ack.items and ack.algorithm in GATHERED
        self.depth = min(RECV_DEPTH, len(plan))
        self.device = device
        self.staged_bytes = max_bucket_bytes([b for b in plan if not self._lands_in_place(b)])
        # allocated on first use: in-place buckets need none
        staging_depth = min(IN_PLACE_STAGING_DEPTH, self.depth) if self.in_place else self.depth
        self.staging: list[torch.Tensor | None] = [None] * staging_depth
        self.staging_users: list[Future | None] = [None] * staging_depth
        self.staged_count = 0
        self.verifying: list[Future | None] = [None] * self.depth
        self.posted: deque[_Posted] = deque()
        self.next_post = 0

    def _lands_in_place(self, bucket: Bucket) -> bool:
        return self.packed_in_place if not bucket.direct else self.in_place

    def pending(self) -> bool:
        return self.next_post < len(self.plan) or bool(self.posted)

    def post_ahead(self, pg) -> None:
        """Post receives into every free slot, up to the plan's end."""
        while self.next_post < len(self.plan) and len(self.posted) < self.depth:
            slot = self.next_post % self.depth
            bucket = self.plan[self.next_post]
            in_place = self._lands_in_place(bucket)
            staging = None if in_place else self.staged_count % len(self.staging)
            if not self._free(self.verifying[slot]):
                break
            if staging is not None and not self._free(self.staging_users[staging]):
                break
            if in_place:
                self.destination.resume.forget(bucket.index)  # its bytes change from now on
                targets = self.destination.places_of(bucket)
                whole = targets[0] if bucket.direct else None
            else:
                if self.staging[staging] is None:
                    self.staging[staging] = self.device.empty(self.staged_bytes)
                whole = self.staging[staging][: bucket.nbytes]
                spans = message_spans(bucket, self.item_messages)
                targets = [whole[offset : offset + n] for offset, n in spans]
                self.staged_count += 1
            tag = bucket_tag(bucket)
            works = [pg.recv([target], SOURCE_RANK, tag) for target in targets]
            self.posted.append(_Posted(bucket, works, targets, whole, slot, in_place, staging))
            self.next_post += 1

    def _free(self, last_user: Future | None) -> bool:
        """Whether what `last_user` (a verification) used may be used again now: at once
        if it is done, after waiting for it if no receive is posted (nothing else to wait
        for); False to wait for a receive first (it frees up meanwhile)."""
        if last_user is None:
            return True
        if not last_user.done() and self.posted:
            return False
        last_user.result()  # raises the verification failure, if any
        return True

    def verification_started(self, posted: _Posted, future: Future) -> None:
        self.verifying[posted.slot] = future
        if posted.staging is not None:
            self.staging_users[posted.staging] = future

    def take_oldest(self) -> _Posted:
        return self.posted.popleft()

    def wait_verified(self) -> None:
        for future in self.verifying:
            if future is not None:
                future.result()


class ReceivePipeline:
    """Receive `plan` (the buckets to receive: a resumed attempt skips verified ones)
    from the source at `host` that sent `ack`, into `destination`."""

    def __init__(
        self,
        host: str,
        ack: protocol.Ack,
        plan: list[Bucket],
        destination: Destination,
        settings: TransferSettings,
        checksum_key: bytes,
        label: str,
    ) -> None:
        self.host = host
        self.ack = ack
        self.plan = plan
        self.destination = destination
        self.settings = settings
        self.checksum_key = checksum_key
        self.label = label
        self.pg = None
        self.all_received = False  # every receive posted on pg has completed
        self._group_lock = threading.Lock()
        self._discarded = False
        self.setup_s = 0.0
        self.gate = WriteGate()
        self.device: TransferDevice = device_for(destination.device)

    def abort(self) -> None:
        self.gate.close()
        with self._group_lock:
            destroy_group(self.pg)

    def discard(self) -> None:
        """End the attempt's group (process_group.discard_group: fenced at once unless
        every posted receive completed). A group the abandoned receiving thread finishes
        creating after this is discarded as soon as it exists."""
        with self._group_lock:
            self._discarded = True
            discard_group(self, quiet=self.all_received)

    def run(self, watchdog: Watchdog) -> None:
        self.device.enter_thread()
        verifier = ThreadPoolExecutor(
            1, thread_name_prefix="netloader-verify", initializer=self.device.enter_thread
        )
        try:
            # e.g. compile the hash kernel while the group comes up, not at the first bucket
            verifier.submit(warm_up, self.ack.algorithm)
            self._join_group(watchdog)
            self._receive(watchdog, verifier)
        finally:
            # buckets that arrived whole are still verified (and kept for a resume) when a
            # later one fails; each verification is bounded, and the gate decides whether
            # it may still write
            verifier.shutdown(wait=True)

    def _join_group(self, watchdog: Watchdog) -> None:
        settings = self.settings
        watchdog.phase("process-group setup", settings.pg_setup_timeout_s)
        t0 = time.monotonic()
        wait_for_store(
            self.host, self.ack.store_port, settings.pg_setup_timeout_s, watchdog.cancelled.is_set
        )
        watchdog.check()
        pg = create_transfer_group(
            self.destination.device.type,
            self.host,
            self.ack.store_port,
            CLIENT_RANK,
            self.ack.session,
            settings.pg_setup_timeout_s,
            settings.bucket_timeout_s,
            streams=self.ack.streams,
        )
        with self._group_lock:
            self.pg = pg
            if self._discarded:  # the attempt ended while the group came up
                discard_group(self)
        watchdog.check()
        self.setup_s = time.monotonic() - t0

    def _receive(self, watchdog: Watchdog, verifier: ThreadPoolExecutor) -> None:
        settings = self.settings
        ring = _ReceiveRing(self.plan, self.destination, self.device, self.ack)
        progress = ProgressReporter(
            sum(b.nbytes for b in self.plan), self.label, log, settings.progress_interval_s
        )
        while ring.pending():
            ring.post_ahead(self.pg)
            posted = ring.take_oldest()
            self._await_bucket(posted.bucket, posted.works, watchdog)
            ring.verification_started(posted, verifier.submit(self._verify_and_write, posted))
            progress.advance(posted.bucket.nbytes)
        self.all_received = True
        watchdog.phase("checksum verification", settings.bucket_timeout_s)
        ring.wait_verified()

    def _await_bucket(self, bucket: Bucket, works: list, watchdog: Watchdog) -> None:
        timeout_s = self.settings.bucket_timeout_s
        # the backend's own timeout (bucket_timeout_s) should fire first; the watchdog is
        # the backstop for a backend that does not honour it (or a bucket of many messages
        # that each take almost that long)
        watchdog.phase(f"bucket {bucket.index}/{len(self.plan)}", _backstop(timeout_s))
        deadline = time.monotonic() + timeout_s
        for work in works:
            await_work(
                work, self.device, timeout_s, f"bucket {bucket.index}", watchdog.cancelled.is_set, deadline
            )
        watchdog.check()

    def _verify_and_write(self, posted: _Posted) -> None:
        """Check a received bucket; only then publish it in the destination tensors."""
        bucket, data = posted.bucket, posted.whole
        expected = self.ack.checksums[bucket.index]
        t = time.perf_counter()
        if data is not None:
            actual = digest(data, self.ack.algorithm, self.checksum_key)
        else:
            actual = digest_pieces(posted.targets, self.ack.algorithm, self.checksum_key)
        log.debug("bucket %d: checksum %.1f ms", bucket.index, 1e3 * (time.perf_counter() - t))
        if actual != expected:
            first, last = bucket.items[0].name, bucket.items[-1].name
            names = first if first == last else f"{first} .. {last}"
            raise ChecksumMismatch(f"checksum mismatch in bucket {bucket.index} ({names})")
        self.gate.write(
            lambda: self.destination.write(bucket, data, expected, self.device, posted.in_place)
        )


def _backstop(timeout_s: float) -> float:
    return timeout_s * 1.2 + 1.0
