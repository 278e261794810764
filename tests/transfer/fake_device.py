"""A fake asynchronous accelerator on CPU: NCCL/HCCL semantics the transfer path must obey.

- `FakeAsyncGroup` wraps a real two-rank gloo group. `send`/`recv` return at once; the
  real operation runs later in a background thread, and a received buffer is written
  only some time after the bytes arrived. `wait()` returns at once and proves nothing
  (as on NCCL, where it only orders the current stream); `is_completed()` tells the
  truth. After `abort()`, every receive still pending lands garbage in its buffer, late.
- `FakeAsyncDevice` stands for the accelerator: copies are enqueued on the calling
  thread's current stream and run later; `synchronize()` drains the transfer stream. It
  records, per thread, whether the device was set, which stream each copy went to (the
  default stream is the one inference runs on) and every synchronization.

Tests install both with `install(monkeypatch)`; CPU tensors then behave like device ones.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import defaultdict

import torch

from loader.transfer.buckets import copy_bytes
from loader.transfer.device import TransferDevice

LATE_S = 0.03  # how long after the real operation its effect becomes visible
GARBAGE = 0xA5


class FakeStream:
    """Runs enqueued callables in order, each LATE_S after it was enqueued."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._queue: queue.Queue = queue.Queue()
        self._pending = 0
        self._cond = threading.Condition()
        threading.Thread(target=self._run, name=f"fake-{name}", daemon=True).start()

    def marker(self) -> threading.Event:
        """Set once everything enqueued so far has run (a recorded event)."""
        reached = threading.Event()
        self.enqueue(reached.set)
        return reached

    def enqueue(self, fn) -> None:
        with self._cond:
            self._pending += 1
        self._queue.put((time.monotonic() + LATE_S, fn))

    def _run(self) -> None:
        while True:
            due, fn = self._queue.get()
            time.sleep(max(0.0, due - time.monotonic()))
            try:
                fn()
            finally:
                with self._cond:
                    self._pending -= 1
                    self._cond.notify_all()

    def synchronize(self) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._pending == 0)


DEFAULT_STREAM = FakeStream("default")  # where inference runs: transfers must stay off it


class FakeAsyncDevice(TransferDevice):
    log: dict = defaultdict(list)  # thread name -> events ("set_device", "copy@stream", "sync")
    _current = threading.local()

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device("cpu")
        self.is_async = True
        self.stream = FakeStream("transfer")

    def enter_thread(self) -> None:
        self._record("set_device")
        FakeAsyncDevice._current.stream = self.stream

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        stream = getattr(FakeAsyncDevice._current, "stream", DEFAULT_STREAM)
        self._record(f"copy@{stream.name}")
        stream.enqueue(lambda: copy_bytes(dst, src))

    def synchronize(self) -> None:
        self._record("sync")
        self.stream.synchronize()

    def _record(self, event: str) -> None:
        FakeAsyncDevice.log[threading.current_thread().name].append(event)


class FakeWork:
    def __init__(self) -> None:
        self._done = threading.Event()
        self.error: BaseException | None = None

    def is_completed(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout=None) -> bool:
        if self._done.is_set() and self.error is not None:
            raise self.error
        return True  # like NCCL: returns at once, whether or not the data is there

    def finish(self, error: BaseException | None = None) -> None:
        self.error = error
        self._done.set()


class FakeAsyncGroup:
    def __init__(self, pg) -> None:
        self.pg = pg
        self.aborted = threading.Event()

    def send(self, tensors, dst: int, tag: int) -> FakeWork:
        work = FakeWork()
        # as NCCL does: the send runs after what the caller's current stream holds now
        # (the packing copies), and reads the buffer only when it runs
        ordered_after = getattr(FakeAsyncDevice._current, "stream", DEFAULT_STREAM).marker()

        def run() -> None:
            ordered_after.wait()
            time.sleep(LATE_S)
            try:
                self.pg.send(tensors, dst, tag).wait()
                work.finish()
            except Exception as exc:
                work.finish(exc)

        threading.Thread(target=run, daemon=True, name="fake-nccl-send").start()
        return work

    def recv(self, tensors, src: int, tag: int) -> FakeWork:
        work = FakeWork()
        target = tensors[0]

        def run() -> None:
            private = torch.empty_like(target)
            try:
                self.pg.recv([private], src, tag).wait()
                error = None
            except Exception as exc:
                error = exc
            time.sleep(LATE_S)
            if self.aborted.is_set() or error is not None:
                target.view(torch.uint8).fill_(GARBAGE)  # an aborted receive lands garbage
            else:
                target.copy_(private)
            work.finish(error)

        threading.Thread(target=run, daemon=True, name="fake-nccl-recv").start()
        return work

    def abort(self) -> None:
        self.aborted.set()
        abort = getattr(self.pg, "abort", None)
        if abort is not None:
            abort()


def install(monkeypatch) -> type[FakeAsyncDevice]:
    """Make the client and server in this process use the fake device and group."""
    import loader.transfer.receive_pipeline as receive_module
    import loader.transfer.served_plans as plans_module
    import loader.transfer.server as server_module

    FakeAsyncDevice.log.clear()
    for module in (receive_module, server_module):
        real = module.create_transfer_group
        monkeypatch.setattr(module, "create_transfer_group", lambda *a, _r=real, **k: FakeAsyncGroup(_r(*a, **k)))
    for module in (receive_module, server_module, plans_module):
        monkeypatch.setattr(module, "device_for", FakeAsyncDevice)
    return FakeAsyncDevice
