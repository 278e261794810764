"""Bucket planning: coalesce small tensors into flat byte buffers, send large ones directly.

Gloo send/recv is ~3x slower at 1 MiB than at 64 MiB per operation when operations
run one at a time, so small tensors are packed into buckets of up to `bucket_bytes`.
A tensor of at least 1/16 of a bucket (4 MiB of 64) goes as its own operation straight
from/into its storage: that saves a copy on each side, and with several receives
posted ahead the per-operation cost is hidden. Both sides derive the same plan from the
same manifest and bucket size, so the threshold is part of the protocol.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from loader.manifest import TensorSpec


@dataclass(frozen=True)
class BucketItem:
    name: str
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Bucket:
    index: int
    direct: bool  # one tensor sent from/into its own storage
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
            item = BucketItem(spec.name, 0, spec.nbytes)
            buckets.append(Bucket(len(buckets), True, (item,), spec.nbytes))
            continue
        if used + spec.nbytes > bucket_bytes:
            flush()
        pending.append(BucketItem(spec.name, used, spec.nbytes))
        used += spec.nbytes
    flush()
    return buckets


def max_packed_bytes(buckets: list[Bucket]) -> int:
    return max((b.nbytes for b in buckets if not b.direct), default=0)


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """1-D uint8 view of a contiguous tensor's bytes (shares storage)."""
    return t.detach().reshape(-1).view(torch.uint8)


def pack_bucket(
    bucket: Bucket, tensors: dict[str, torch.Tensor], buffer: torch.Tensor
) -> torch.Tensor:
    """Copy the bucket's tensors into `buffer` (uint8, >= bucket.nbytes); return the used slice."""
    out = buffer[: bucket.nbytes]
    for item in bucket.items:
        copy_bytes(
            out[item.offset : item.offset + item.nbytes], byte_view(tensors[item.name].contiguous())
        )
    return out


def unpack_bucket(bucket: Bucket, data: torch.Tensor, tensors: dict[str, torch.Tensor]) -> None:
    """Scatter a received packed bucket into the destination tensors."""
    for item in bucket.items:
        dest = tensors[item.name]
        src = data[item.offset : item.offset + item.nbytes]
        if dest.is_contiguous():
            copy_bytes(byte_view(dest), src)
        else:
            # clone: packed offsets need not be aligned for a dtype view
            dest.copy_(src.clone().view(dest.dtype).view(dest.shape))


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
