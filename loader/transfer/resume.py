"""What survives from one source attempt to the next: the buckets already verified in the
destination tensors (and against which checksum), and the failure that ends an attempt."""

from __future__ import annotations

import threading

from loader.transfer import protocol


class SourceFailure(Exception):
    """This source cannot serve us; the message is the reason recorded."""


class ResumeState:
    """Buckets verified in the destination tensors by earlier attempts, with the checksum
    each was verified against. Passed from attempt to attempt (and source to source) so
    an interrupted transfer continues where it stopped instead of starting over."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.bucket_bytes: int | None = None
        self._checksums: dict[int, str] = {}

    def offer(self) -> protocol.Resume | None:
        with self._lock:
            if not self._checksums or self.bucket_bytes is None:
                return None
            return protocol.Resume.of(self.bucket_bytes, self._checksums)

    def accept(self, ack: protocol.Ack) -> frozenset[int]:
        """The buckets this attempt skips: those the source says it will not send. Each
        must be one we verified, against the very checksum the source announces now."""
        with self._lock:
            if ack.bucket_bytes != self.bucket_bytes:
                self.bucket_bytes, self._checksums = ack.bucket_bytes, {}
            for i in ack.skip:
                if self._checksums.get(i) != ack.checksums[i]:
                    self._checksums.clear()
                    raise SourceFailure(
                        f"resume: source skips bucket {i}, which we do not hold verified"
                    )
            return ack.skip

    def forget(self, index: int) -> None:
        """About to receive into this bucket again: it is no longer known good."""
        with self._lock:
            self._checksums.pop(index, None)

    def record(self, index: int, checksum: str) -> None:
        with self._lock:
            self._checksums[index] = checksum

    @property
    def verified_buckets(self) -> int:
        with self._lock:
            return len(self._checksums)

    @property
    def verified_indices(self) -> frozenset[int]:
        with self._lock:
            return frozenset(self._checksums)
