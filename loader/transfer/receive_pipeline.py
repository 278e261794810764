"""One attempt's data path on the client: the process group, then each bucket received
into a staging slot private to the attempt, verified there (in a helper thread, while
the next ones arrive) and only then copied into the destination through the attempt's
WriteGate. A failed source may go on sending (a backend cannot cancel a posted receive),
but its bytes land in staging memory nobody reads again."""

from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from loader.config import TransferSettings
from loader.transfer import protocol
from loader.transfer.buckets import Bucket, bucket_tag, max_bucket_bytes, unpack_bucket
from loader.transfer.checksum import digest
from loader.transfer.device import TransferDevice, await_work, device_for
from loader.transfer.process_group import (
    CLIENT_RANK,
    SOURCE_RANK,
    create_transfer_group,
    destroy_group,
    wait_for_store,
)
from loader.transfer.progress import ProgressReporter
from loader.transfer.resume import ResumeState
from loader.transfer.watchdog import Watchdog
from loader.transfer.write_gate import WriteGate

log = logging.getLogger(__name__)

RECV_DEPTH = 4  # staging slots: receives posted ahead of the one being verified


class ChecksumMismatch(Exception):
    """A staged bucket does not match the checksum the source announced."""


@dataclass(frozen=True)
class Destination:
    """Where verified buckets land: the destination tensors (on `device`), the resume
    state that remembers each one and the observer (a relay) told of it."""

    tensors: dict[str, torch.Tensor]
    device: torch.device
    resume: ResumeState
    source: str
    observer: object = None

    def write(self, bucket: Bucket, data: torch.Tensor, checksum: str, device: TransferDevice) -> None:
        self.resume.forget(bucket.index)
        unpack_bucket(bucket, data, self.tensors, device.copy)
        device.synchronize()  # the bytes are in place before anyone is told
        self.resume.record(bucket.index, checksum)
        if self.observer is not None:
            self.observer.bucket_verified(self.source, bucket.index)


class _StagingRing:
    """The staging slots: bucket i uses slot i % depth, and a slot is posted again only
    once the bucket that used it last was verified and copied out."""

    def __init__(self, plan: list[Bucket], device: TransferDevice) -> None:
        self.plan = plan
        self.depth = min(RECV_DEPTH, len(plan))
        size = max_bucket_bytes(plan)
        self.slots = [device.empty(size) for _ in range(self.depth)]
        self.verifying: list[Future | None] = [None] * self.depth
        self.posted: deque[tuple[Bucket, object, torch.Tensor, int]] = deque()
        self.next_post = 0

    def pending(self) -> bool:
        return self.next_post < len(self.plan) or bool(self.posted)

    def post_ahead(self, pg) -> None:
        """Post receives into every free slot, up to the plan's end."""
        while self.next_post < len(self.plan) and len(self.posted) < self.depth:
            slot = self.next_post % self.depth
            previous = self.verifying[slot]
            if previous is not None and not previous.done() and self.posted:
                break  # wait for a receive first; the slot frees up meanwhile
            if previous is not None:
                previous.result()  # raises the verification failure, if any
            bucket = self.plan[self.next_post]
            target = self.slots[slot][: bucket.nbytes]
            work = pg.recv([target], SOURCE_RANK, bucket_tag(bucket))
            self.posted.append((bucket, work, target, slot))
            self.next_post += 1

    def take_oldest(self) -> tuple[Bucket, object, torch.Tensor, int]:
        """The oldest posted receive: (bucket, work, staging target, slot)."""
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
        self.setup_s = 0.0
        self.gate = WriteGate()
        self.device: TransferDevice = device_for(destination.device)

    def abort(self) -> None:
        self.gate.close()
        destroy_group(self.pg)

    def run(self, watchdog: Watchdog) -> None:
        self.device.enter_thread()
        self._join_group(watchdog)
        self._receive(watchdog)

    def _join_group(self, watchdog: Watchdog) -> None:
        settings = self.settings
        watchdog.phase("process-group setup", settings.pg_setup_timeout_s)
        t0 = time.monotonic()
        wait_for_store(
            self.host, self.ack.store_port, settings.pg_setup_timeout_s, watchdog.cancelled.is_set
        )
        watchdog.check()
        self.pg = create_transfer_group(
            self.destination.device.type,
            self.host,
            self.ack.store_port,
            CLIENT_RANK,
            self.ack.session,
            settings.pg_setup_timeout_s,
            settings.bucket_timeout_s,
        )
        watchdog.check()
        self.setup_s = time.monotonic() - t0

    def _receive(self, watchdog: Watchdog) -> None:
        settings = self.settings
        ring = _StagingRing(self.plan, self.device)
        progress = ProgressReporter(
            sum(b.nbytes for b in self.plan), self.label, log, settings.progress_interval_s
        )
        verifier = ThreadPoolExecutor(
            1, thread_name_prefix="netloader-verify", initializer=self.device.enter_thread
        )
        try:
            while ring.pending():
                ring.post_ahead(self.pg)
                bucket, work, target, slot = ring.take_oldest()
                self._await_bucket(bucket, work, watchdog)
                ring.verifying[slot] = verifier.submit(self._verify_and_write, bucket, target)
                progress.advance(bucket.nbytes)
            watchdog.phase("checksum verification", settings.bucket_timeout_s)
            ring.wait_verified()
        finally:
            # buckets that arrived whole are still verified (and kept for a resume) when a
            # later one fails; each verification is bounded, and the gate decides whether
            # it may still write
            verifier.shutdown(wait=True)

    def _await_bucket(self, bucket: Bucket, work, watchdog: Watchdog) -> None:
        timeout_s = self.settings.bucket_timeout_s
        # the backend's own timeout (bucket_timeout_s) should fire first; the watchdog is
        # the backstop for a backend that does not honour it
        watchdog.phase(f"bucket {bucket.index}/{len(self.plan)}", _backstop(timeout_s))
        await_work(
            work, self.device, timeout_s, f"bucket {bucket.index}", watchdog.cancelled.is_set
        )
        watchdog.check()

    def _verify_and_write(self, bucket: Bucket, data: torch.Tensor) -> None:
        """Check a staged bucket; only then copy it into the destination tensors."""
        expected = self.ack.checksums[bucket.index]
        t = time.perf_counter()
        actual = digest(data, self.ack.algorithm, self.checksum_key)
        log.debug("bucket %d: checksum %.1f ms", bucket.index, 1e3 * (time.perf_counter() - t))
        if actual != expected:
            first, last = bucket.items[0].name, bucket.items[-1].name
            names = first if first == last else f"{first} .. {last}"
            raise ChecksumMismatch(f"checksum mismatch in bucket {bucket.index} ({names})")
        self.gate.write(lambda: self.destination.write(bucket, data, expected, self.device))


def _backstop(timeout_s: float) -> float:
    return timeout_s * 1.2 + 1.0
