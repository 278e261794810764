"""Progress log lines for long transfers: bytes done, GiB/s and ETA every few seconds."""

from __future__ import annotations

import logging
import time

GIB = float(1 << 30)


class ProgressReporter:
    def __init__(
        self,
        total_bytes: int,
        label: str,
        logger: logging.Logger,
        interval_s: float = 5.0,
        clock=time.monotonic,
    ) -> None:
        self.total_bytes = total_bytes
        self.label = label
        self.logger = logger
        self.interval_s = interval_s
        self.clock = clock
        self.started = clock()
        self.done_bytes = 0
        self._last_log = self.started

    def advance(self, nbytes: int) -> None:
        self.done_bytes += nbytes
        now = self.clock()
        if now - self._last_log >= self.interval_s:
            self._last_log = now
            self.logger.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        now = self.clock() if now is None else now
        elapsed = max(now - self.started, 1e-9)
        rate = self.done_bytes / elapsed
        remaining = max(self.total_bytes - self.done_bytes, 0)
        eta = f"{remaining / rate:.1f}s" if rate > 0 else "unknown"
        pct = 100.0 * self.done_bytes / self.total_bytes if self.total_bytes else 100.0
        return (
            f"{self.label}: {self.done_bytes / GIB:.2f}/{self.total_bytes / GIB:.2f} GiB "
            f"({pct:.0f}%), {rate / GIB:.2f} GiB/s, ETA {eta}"
        )
