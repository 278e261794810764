"""Run a blocking data path in a worker thread under per-phase deadlines.

The worker announces each phase with `phase(name, timeout_s)`; if a phase outlives its
timeout the caller gets PhaseTimeout, `on_timeout` runs (e.g. aborts the process group
so the blocked receive errors out) and the worker is abandoned. A hung peer thus costs
the caller at most the phase timeout, whatever the communication backend does.

An abandoned worker may still be blocked inside the backend (gloo's abort does not
wake a pending recv), so it must call `check()` (or `phase()`) after every blocking
operation: once cancelled, those raise instead of letting it touch more state.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class PhaseTimeout(Exception):
    pass


class Interrupted(Exception):
    """`interrupt()` gave a reason to stop (e.g. the peer said it failed)."""


class Watchdog:
    def __init__(self, clock=time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._phase = "start"
        self._timeout_s = float("inf")
        self._deadline = float("inf")
        self.cancelled = threading.Event()

    def check(self) -> None:
        if self.cancelled.is_set():
            raise PhaseTimeout(f"abandoned after {self._phase} timed out")

    def phase(self, name: str, timeout_s: float) -> None:
        self.check()
        with self._lock:
            self._phase, self._timeout_s = name, timeout_s
            self._deadline = self._clock() + timeout_s

    def expired(self) -> tuple[str, float] | None:
        with self._lock:
            if self._clock() > self._deadline:
                return self._phase, self._timeout_s
            return None

    def run(
        self,
        work: Callable[[Watchdog], object],
        on_timeout: Callable[[], None] = lambda: None,
        poll_s: float = 0.05,
        grace_s: float = 5.0,
        name: str = "netloader-transfer",
        interrupt: Callable[[], str | None] = lambda: None,
    ):
        """Run `work(self)` in a thread; return its result or raise its exception.
        `interrupt()` is asked every `poll_s`: a reason abandons the work like a timeout
        (`on_timeout` runs) and raises Interrupted(reason)."""
        result: dict = {}

        def target() -> None:
            try:
                result["value"] = work(self)
            except BaseException as exc:  # handed to the caller
                result["error"] = exc

        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(poll_s)
            late = self.expired()
            stop = interrupt() if late is None and thread.is_alive() else None
            if (late is not None or stop is not None) and thread.is_alive():
                self.cancelled.set()
                try:
                    on_timeout()
                finally:
                    thread.join(grace_s)
                if stop is not None:
                    raise Interrupted(stop)
                raise PhaseTimeout(f"{late[0]} timed out after {late[1]:g}s")
        if "error" in result:
            raise result["error"]
        return result.get("value")
