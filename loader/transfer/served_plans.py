"""What a source sends for a bucket size: the bucket plan and the keyed checksum of every
bucket, computed once per size from tensors that do not change while served."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import torch

from loader.transfer.buckets import Bucket, BucketReader, plan_buckets
from loader.transfer.checksum import digest
from loader.transfer.device import TransferDevice, device_for
from loader.transfer.manifest import Manifest

log = logging.getLogger(__name__)

_MIB = 1 << 20
# the bucket sizes a source serves (plus its own): a client cannot make it hash the
# model again for arbitrary sizes, and the checksums of every size stay cached
BUCKET_SIZES = tuple(_MIB << k for k in (0, 2, 4, 6, 8))


def choose_bucket_bytes(own: int, client_max: int) -> int | None:
    """The largest served size that is at most both ours and the client's; None if none."""
    fitting = [b for b in (*BUCKET_SIZES, own) if b <= min(own, client_max)]
    return max(fitting, default=None)


@dataclass(frozen=True)
class ServedPlan:
    """What a session sends: the buckets and their keyed checksums."""

    buckets: list[Bucket]
    checksums: tuple[str, ...]
    algorithm: str  # the checksums'


class ServedPlans:
    """Plans and keyed checksums of `tensors` (each storage once), cached per bucket size
    (the sizes are the few that choose_bucket_bytes allows, so the cache is bounded)."""

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        manifest: Manifest,
        device: torch.device,
        algorithm: str,
        key: bytes,
        rank: int,
    ) -> None:
        self._tensors = tensors
        self._manifest = manifest
        self._device = device
        self.algorithm = algorithm
        self._key = key
        self._rank = rank
        self._plans: dict[int, ServedPlan] = {}
        self._lock = threading.Lock()

    def of(self, tensors: dict[str, torch.Tensor], manifest: Manifest) -> ServedPlans:
        """Plans of other tensors (a resharding request's pieces), served the same way."""
        return ServedPlans(tensors, manifest, self._device, self.algorithm, self._key, self._rank)

    def plan_for(self, bucket_bytes: int, device: TransferDevice) -> ServedPlan:
        """`device` is the calling thread's (entered) transfer device."""
        with self._lock:
            cached = self._plans.get(bucket_bytes)
            if cached is not None:
                return cached
            plan = plan_buckets(self._manifest.specs, bucket_bytes)
            reader = BucketReader(self._tensors, device.copy, device.device)
            scratch = device.empty(reader.staging_bytes(plan))
            checksums = []
            for bucket in plan:
                data = reader.read(bucket, scratch)
                device.synchronize()  # packed before hashed, whatever stream the hash uses
                checksums.append(digest(data, self.algorithm, self._key))
            self._plans[bucket_bytes] = ServedPlan(plan, tuple(checksums), self.algorithm)
            return self._plans[bucket_bytes]

    def precompute(self, bucket_bytes: int) -> None:
        """Cache the plan for `bucket_bytes` before a client asks (on a thread of its own:
        it enters the transfer device). Never raises."""
        try:
            device = device_for(self._device)
            device.enter_thread()
            self.plan_for(bucket_bytes, device)
        except Exception:
            log.exception("netloader server rank %d: checksum precomputation failed", self._rank)
