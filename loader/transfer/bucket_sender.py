"""One session's data path on the source: buckets read from the served tensors (staged
onto the transfer device when packed or in host memory) and sent over the session's
process group, a few in flight."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import torch

from loader.transfer.buckets import Bucket, BucketReader, bucket_tag
from loader.transfer.device import TransferDevice, await_work
from loader.transfer.process_group import CLIENT_RANK

SEND_DEPTH = 4  # sends in flight; the client posts as many receives ahead


class _Send:
    """A bucket's in-flight sends (one per message). Gloo counts completions per buffer,
    so waiting twice on one send blocks until a later send completes: complete() waits
    only once."""

    def __init__(self, works: list, data: list[torch.Tensor], what: str) -> None:
        self.works = works
        self.data = data  # keeps temporaries (non-contiguous sources) alive until sent
        self.what = what
        self.done = False

    def complete(self, device: TransferDevice, timeout_s: float) -> None:
        if not self.done:
            for work in self.works:
                await_work(work, device, timeout_s, self.what)
            self.done = True


class BucketSender:
    """Sends buckets of `tensors` (each storage once); every send is bounded by
    `timeout_s`. One sender serves all sessions of a server."""

    def __init__(self, tensors: dict[str, torch.Tensor], timeout_s: float) -> None:
        self.tensors = tensors
        self.timeout_s = timeout_s

    def send(
        self,
        pg,
        buckets: list[Bucket],
        device: TransferDevice,
        before_bucket: Callable[[Bucket], None],
        item_messages: bool = False,
    ) -> None:
        """Send `buckets` (those the client lacks) in order over `pg`, up to SEND_DEPTH
        buckets in flight (counted by completion), each as the messages `message_spans`
        names (`item_messages`: as the ack announced). `before_bucket` runs before each
        bucket is read (it may wait until the bucket may be sent, or raise to end the
        session); `device` is the calling thread's (entered) transfer device.

        Buckets that are copied to be sent alternate between two buffers; a buffer is
        refilled only after the send that used it completed."""
        reader = BucketReader(self.tensors, device.copy, device.device)
        buffers = [device.empty(reader.staging_bytes(buckets, item_messages)) for _ in range(2)]
        buffer_work: list[_Send | None] = [None, None]
        in_flight: deque[_Send] = deque()
        staged_count = 0
        for bucket in buckets:
            before_bucket(bucket)
            slot = None
            if reader.needs_buffer(bucket, item_messages):
                slot = staged_count % 2
                staged_count += 1
                if buffer_work[slot] is not None:
                    buffer_work[slot].complete(device, self.timeout_s)
            data = reader.messages(bucket, buffers[slot] if slot is not None else None, item_messages)
            tag = bucket_tag(bucket)
            works = [pg.send([message], CLIENT_RANK, tag) for message in data]
            send = _Send(works, data, f"sending bucket {bucket.index}")
            if slot is not None:
                buffer_work[slot] = send
            in_flight.append(send)
            while len(in_flight) > SEND_DEPTH:
                in_flight.popleft().complete(device, self.timeout_s)
        for send in in_flight:
            send.complete(device, self.timeout_s)
