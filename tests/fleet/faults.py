"""The faults a fleet node can be told to inject: a slow or corrupting root source, and a
relay that dies mid-transfer."""

from __future__ import annotations

import os
import signal
import time

from loader.distribution.relay import Relay
from loader.transfer.buckets import byte_view
from loader.transfer.server import WeightServer
from loader.transfer.serving_strategy import FixedTensors


class FaultySource(FixedTensors):
    """Root source's strategy with test faults: a delay per bucket (a slow link on
    loopback) and bytes changed in one bucket after its checksum was computed
    (corruption in flight)."""

    bucket_delay_s = 0.0
    corrupt_bucket: int | None = None
    _corrupted: tuple[str, int] | None = None  # (tensor, byte) changed; restored later
    _corrupted_by = None  # the session that saw the corruption
    hold_corrupt = None  # called (may block) just before the corrupt bucket is changed

    def attach(self, server: WeightServer) -> None:
        super().attach(server)
        self._tensors = server.tensors

    def _flip(self, where: tuple[str, int]) -> None:
        byte_view(self._tensors[where[0]])[where[1]] ^= 0x40

    def before_bucket(self, session, bucket) -> None:
        if self.bucket_delay_s:
            time.sleep(self.bucket_delay_s)
        # a transient fault: once only. The next session may resume past bucket 0 (it
        # skips what the client verified), so any bucket of it restores the tensor.
        if self._corrupted is not None and session is not self._corrupted_by:
            self._flip(self._corrupted)
            self._corrupted, self._corrupted_by, self.corrupt_bucket = None, None, None
        if bucket.index == self.corrupt_bucket and self._corrupted is None:
            if self.hold_corrupt is not None:
                self.hold_corrupt()
            item = bucket.items[0]  # a byte inside this very bucket
            self._corrupted, self._corrupted_by = (item.name, item.tensor_offset), session
            self._flip(self._corrupted)


class CrashingRelay(Relay):
    """A relay that records what it forwards and, as a test fault, dies (SIGKILL, like a
    crashed host) when about to forward bucket number `die_after_forwarded + 1`."""

    die_after_forwarded: int | None = None
    on_die = None  # called just before the kill (the bench records when and where)
    on_first_forward = None  # called once, when the first bucket is about to be forwarded

    def __init__(self) -> None:
        super().__init__()
        self.forwarded_indices: list[list[int]] = []
        self.upstream_attempts = 0  # transfers begun (each attempt of the fetch)

    def transfer_started(self, source, ack, plan) -> None:
        self.upstream_attempts += 1
        super().transfer_started(source, ack, plan)

    def before_bucket(self, session, bucket) -> None:
        super().before_bucket(session, bucket)
        if (
            self.die_after_forwarded is not None
            and self.buckets_forwarded > self.die_after_forwarded
        ):
            if self.on_die is not None:
                self.on_die()
            os.kill(os.getpid(), signal.SIGKILL)
        if not self.forwarded_indices and self.on_first_forward is not None:
            self.on_first_forward()
        # (upstream attempt number, bucket index): what was forwarded during which attempt
        self.forwarded_indices.append([self.upstream_attempts - 1, bucket.index])
