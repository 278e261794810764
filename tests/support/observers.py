"""Transfer observers the fleet tests use to record what each node saw."""

from __future__ import annotations

import threading
import time


class ObserverFanout:
    """Pass each event to several observers, in order."""

    def __init__(self, *observers) -> None:
        self.observers = [o for o in observers if o is not None]

    def transfer_started(self, source, ack, plan) -> None:
        for o in self.observers:
            o.transfer_started(source, ack, plan)

    def bucket_verified(self, source, index) -> None:
        for o in self.observers:
            o.bucket_verified(source, index)

    def attempt_failed(self, source, reason) -> None:
        for o in self.observers:
            o.attempt_failed(source, reason)


class ProgressRecorder:
    """Verified bytes over time (wall clock, so several processes share one time axis)."""

    def __init__(self, clock=time.time) -> None:
        self._clock = clock
        self._sizes: list[int] = []
        self._lock = threading.Lock()
        self.samples: list[tuple[float, int]] = []  # (time, verified bytes of the attempt)
        self.events: list[tuple[float, str, str]] = []  # (time, "start"|"failed", source)
        self._done = 0

    def transfer_started(self, source, ack, plan) -> None:
        with self._lock:
            self._sizes = [b.nbytes for b in plan]
            self._done = 0
            now = self._clock()
            self.events.append((now, "start", source))
            self.samples.append((now, 0))

    def bucket_verified(self, source, index) -> None:
        with self._lock:
            if 0 <= index < len(self._sizes):
                self._done += self._sizes[index]
                self.samples.append((self._clock(), self._done))

    def attempt_failed(self, source, reason) -> None:
        with self._lock:
            self.events.append((self._clock(), "failed", source))
