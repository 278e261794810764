"""What the transfer needs from a device, written for asynchronous accelerators.

On NCCL/HCCL a backend `work.wait()` does not block the CPU: it only makes the current
stream wait. So the transfer path never relies on `wait()` for completion:

- every backend operation is awaited with `await_work`, which polls
  `work.is_completed()` against a real deadline (bounded in-flight work, per-bucket
  timeouts measured from when the operation could start, not from enqueue);
- transfer threads run on a dedicated stream (`TransferDevice.stream`), never on the
  stream inference uses, after `enter_thread()` has set the device for that thread;
- device copies are ordered on that stream and `synchronize()`d before anything is
  declared verified, and after an abort.

CPU (Gloo) is the special case where all of this is synchronous. Tests substitute an
asynchronous fake (tests/transfer/fake_device.py) through `device_for`.
"""

from __future__ import annotations

import os
import time

import torch

from loader.transfer.buckets import copy_bytes


class WorkTimeout(TimeoutError):
    pass


class TransferDevice:
    """One per transfer attempt or served session: its device and its own stream."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.is_async = device.type != "cpu"
        self.stream = None
        if self.is_async:
            self.stream = torch.Stream(device=device)
            # whatever the creating thread enqueued so far (e.g. the weights being
            # written) comes before anything this transfer does
            self.stream.wait_stream(torch.accelerator.current_stream(device))

    @property
    def receives_in_place(self) -> bool:
        """Whether a receive may be posted straight into the destination tensors (bytes
        unverified until their checksum is checked, published only then). Only where the
        backend can be fenced, so that once an attempt ends nothing its source sends can
        land anywhere: Gloo (process_group.fence_gloo closes the group's connections). Not
        on accelerators, where a receive posted on a stream may still land after an
        abort; there every bucket goes through private staging memory."""
        return not self.is_async

    def enter_thread(self) -> None:
        """Call first in every thread that touches the device: the current device and
        stream are per thread on CUDA and NPU. Makes the transfer stream current."""
        if not self.is_async:
            return
        if self.device.index is not None:
            torch.accelerator.set_device_index(self.device.index)
        torch.accelerator.set_stream(self.stream)

    def empty(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Byte copy, enqueued on the current (transfer) stream on accelerators."""
        copy_bytes(dst, src)

    def synchronize(self) -> None:
        """Block until everything enqueued on the transfer stream has run."""
        if self.stream is not None:
            self.stream.synchronize()


# device memory a communicator takes per session besides our buffers (HCCL allocates
# HCCL_BUFFSIZE MB per direction, 200 by default; NCCL a few MiB per channel)
def communicator_bytes(backend: str) -> int:
    if backend == "hccl":
        return 2 * int(os.environ.get("HCCL_BUFFSIZE", "200")) << 20
    if backend == "nccl":
        return 64 << 20
    return 0


def session_device_bytes(backend: str, bucket_bytes: int) -> int:
    """Device memory one served session needs: two staging buffers and a communicator."""
    return 2 * bucket_bytes + communicator_bytes(backend)


def device_for(device: torch.device) -> TransferDevice:
    return TransferDevice(device)


def await_work(
    work,
    device: TransferDevice,
    timeout_s: float,
    what: str,
    cancelled=lambda: False,
    deadline: float | None = None,
) -> None:
    """Block until a backend operation has completed (or failed: then raise its error),
    at most `timeout_s` (or until `deadline`, a monotonic time, when one timeout covers
    several operations); WorkTimeout after that.

    Accelerators: poll `is_completed()`, because `wait()` returns before the operation
    ran. Gloo: its send/recv work reports completion only through `wait()`, which blocks
    the calling thread and is bounded by the group's own op timeout."""
    if not device.is_async:
        work.wait()
        return
    if deadline is None:
        deadline = time.monotonic() + timeout_s
    pause = 0.0002
    while not work.is_completed():
        if cancelled():
            raise WorkTimeout(f"{what}: abandoned")
        if time.monotonic() > deadline:
            raise WorkTimeout(f"{what} timed out after {timeout_s:g}s")
        time.sleep(pause)
        pause = min(pause * 2, 0.005)
    work.wait()  # completed: returns at once, or raises the operation's error
