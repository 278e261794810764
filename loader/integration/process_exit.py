"""Run cleanup when this process ends, including as a vLLM worker.

vLLM's workers are multiprocessing children: they end through `os._exit` after
multiprocessing's own exit hook, so `atexit` alone never fires there. Registering with
both covers the main process and the children; the callback must be idempotent.
"""

from __future__ import annotations

import atexit
import multiprocessing.util
from collections.abc import Callable

_EXIT_PRIORITY = 50  # before multiprocessing's own low-priority finalizers


def on_process_exit(callback: Callable[[], None]) -> None:
    atexit.register(callback)
    multiprocessing.util.Finalize(None, callback, exitpriority=_EXIT_PRIORITY)
