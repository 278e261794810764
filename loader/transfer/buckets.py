"""Bucket planning: coalesce small tensors into flat byte buffers, split large ones.

Gloo send/recv is ~3x slower at 1 MiB than at 64 MiB per operation when operations
run one at a time, so small tensors are packed into buckets of up to `bucket_bytes`.
A tensor of at least 1/16 of a bucket (4 MiB of 64) is sent straight from its storage
("direct"), in pieces of at most `bucket_bytes`: no bucket is larger than the bucket
size, so the receiver stages every bucket in a fixed set of bucket-sized buffers and
copies it into the destination only once verified. Both sides derive the same plan from
the same manifest and bucket size, so the threshold and the split are protocol.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from loader.transfer.manifest import TensorSpec
from loader.transfer.pieces import write_bytes


@dataclass(frozen=True)
class BucketItem:
    name: str
    offset: int  # where the bytes sit in the bucket
    nbytes: int
    tensor_offset: int = 0  # where they sit in the tensor (pieces of a large tensor)


@dataclass(frozen=True)
class Bucket:
    index: int
    direct: bool  # one piece of one tensor, sent from its own storage
    items: tuple[BucketItem, ...]
    nbytes: int


DIRECT_FRACTION = 16


def direct_min_bytes(bucket_bytes: int) -> int:
    return max(1, bucket_bytes // DIRECT_FRACTION)


def plan_buckets(
    specs: tuple[TensorSpec, ...] | list[TensorSpec], bucket_bytes: int
) -> list[Bucket]:
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    direct_threshold = direct_min_bytes(bucket_bytes)
    buckets: list[Bucket] = []
    pending: list[BucketItem] = []
    used = 0

    def flush() -> None:
        nonlocal pending, used
        if pending:
            buckets.append(Bucket(len(buckets), False, tuple(pending), used))
            pending, used = [], 0

    for spec in specs:
        if spec.nbytes == 0:
            continue
        if spec.nbytes >= direct_threshold:
            flush()
            for start in range(0, spec.nbytes, bucket_bytes):
                n = min(bucket_bytes, spec.nbytes - start)
                buckets.append(Bucket(len(buckets), True, (BucketItem(spec.name, 0, n, start),), n))
            continue
        if used + spec.nbytes > bucket_bytes:
            flush()
        pending.append(BucketItem(spec.name, used, spec.nbytes))
        used += spec.nbytes
    flush()
    return buckets


def max_bucket_bytes(buckets: list[Bucket]) -> int:
    return max((b.nbytes for b in buckets), default=0)


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """1-D uint8 view of a contiguous tensor's bytes (shares storage)."""
    return t.detach().reshape(-1).view(torch.uint8)


class BucketReader:
    """The bytes of a bucket as the source sends them: a view into the tensor for a
    direct piece on the transfer device, a copy in `buffer` otherwise (packed buckets,
    and pieces of tensors kept in host memory). A non-contiguous tensor is made
    contiguous once for all its pieces (the last one is kept)."""

    def __init__(self, tensors: dict[str, torch.Tensor], copy=None, device=None) -> None:
        self.tensors = tensors
        self.copy = copy or copy_bytes
        self.device = device
        self._contiguous: tuple[str, torch.Tensor] | None = None

    def needs_buffer(self, bucket: Bucket, item_messages: bool = False) -> bool:
        """Whether the bucket is copied into a buffer to be sent: a packed one sent as one
        message, or one whose tensors are held off the transfer device."""
        if not (bucket.direct or item_messages):
            return True
        if self.device is None:
            return False
        device_type = torch.device(self.device).type
        return any(self.tensors[item.name].device.type != device_type for item in bucket.items)

    def tensor_bytes(self, name: str) -> torch.Tensor:
        t = self.tensors[name]
        if t.is_contiguous():
            return byte_view(t)
        if self._contiguous is None or self._contiguous[0] != name:
            self._contiguous = (name, byte_view(t.contiguous()))
        return self._contiguous[1]

    def staging_bytes(self, buckets: list[Bucket], item_messages: bool = False) -> int:
        """How large a buffer `messages` needs for these buckets (0 when none needs one)."""
        return max((b.nbytes for b in buckets if self.needs_buffer(b, item_messages)), default=0)

    def messages(self, bucket: Bucket, buffer: torch.Tensor | None, item_messages: bool) -> list[torch.Tensor]:
        """The bucket's bytes as the messages it travels as (message_spans): straight from
        the tensors' storage where they are on the transfer device, else copied into
        `buffer`."""
        if not item_messages or bucket.direct:
            return [self.read(bucket, buffer)]
        if self.needs_buffer(bucket, item_messages):
            whole = self.read(bucket, buffer)
            return [whole[offset : offset + n] for offset, n in message_spans(bucket, True)]
        return [
            self.tensor_bytes(item.name)[item.tensor_offset : item.tensor_offset + item.nbytes]
            for item in bucket.items
        ]

    def read(self, bucket: Bucket, buffer: torch.Tensor | None) -> torch.Tensor:
        out = buffer[: bucket.nbytes] if self.needs_buffer(bucket) else None
        for item in bucket.items:
            data = self.tensor_bytes(item.name)[item.tensor_offset : item.tensor_offset + item.nbytes]
            if out is None:
                return data  # a direct piece, sent from its own storage
            self.copy(out[item.offset : item.offset + item.nbytes], data)
        return out


def message_spans(bucket: Bucket, item_messages: bool) -> list[tuple[int, int]]:
    """The messages a bucket travels as, as (offset in the bucket, bytes): the whole bucket
    in one, or, when the source announced item messages, a packed bucket as one message
    per item (so neither side copies it to or from a packed buffer). Both sides post
    exactly these sizes: a Gloo receive smaller than its message aborts the process."""
    if item_messages and not bucket.direct:
        return [(item.offset, item.nbytes) for item in bucket.items]
    return [(0, bucket.nbytes)]


def unpack_bucket(
    bucket: Bucket, data: torch.Tensor, tensors: dict[str, torch.Tensor], copy=None
) -> None:
    """Write a received bucket's bytes into the destination tensors: contiguous ones, or
    slices of them (a resharding transfer's pieces, written run by run; the client
    refuses other destinations before any transfer). `copy(dst, src)` defaults to
    copy_bytes (a device may enqueue it on its stream)."""
    copy = copy or copy_bytes
    for item in bucket.items:
        dest, src = tensors[item.name], data[item.offset : item.offset + item.nbytes]
        if not dest.is_contiguous():
            write_bytes(dest, item.tensor_offset, src, copy)
            continue
        copy(byte_view(dest)[item.tensor_offset : item.tensor_offset + item.nbytes], src)


def copy_bytes(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy between equal-length uint8 tensors.

    On CPU a plain single-threaded memcpy (numpy): torch's copy_ would fan out over the
    OpenMP pool that the serving model's inference uses, and stall under contention."""
    if dst.device.type == "cpu" and src.device.type == "cpu":
        np.copyto(dst.numpy(), src.numpy())
    else:
        dst.copy_(src)


def bucket_tag(bucket: Bucket) -> int:
    """The send/recv tag of a bucket: several operations are in flight at once, and a
    distinct tag per bucket makes the backend match each send to its receive."""
    return bucket.index % (1 << 30)
