"""The one door through which a transfer attempt writes into the destination tensors.

An attempt's helper threads (verification, an abandoned receive loop) may outlive it;
closing the gate waits for a write in progress and makes every later one fail, so once
the attempt has returned nothing of it can touch the weights again.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class GateClosed(Exception):
    """The attempt has ended; nothing more may be written."""


class WriteGate:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open = True

    def write(self, fn: Callable[[], None]) -> None:
        with self._lock:
            if not self._open:
                raise GateClosed("transfer attempt ended; write refused")
            fn()

    def close(self) -> None:
        with self._lock:
            self._open = False
