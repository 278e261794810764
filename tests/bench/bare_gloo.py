"""The transport's own ceiling for bench-transfer: the same bucket plan over a bare Gloo
group (the product's create_transfer_group, same streams), with nothing of the product
around it: no handshake, checksums, staging copies or watchdog. Direct buckets go from
their tensors into their place, packed ones from a buffer packed once before the round
into a scratch buffer. Netloader over this round is what the product costs beyond Gloo;
this round over raw TCP is what Gloo costs beyond the kernel's socket copies."""

from __future__ import annotations

import time
from collections import deque

import torch

from loader.transfer.buckets import Bucket, BucketReader, bucket_tag, max_bucket_bytes, plan_buckets
from loader.transfer.manifest import build_manifest
from loader.transfer.process_group import (
    CLIENT_RANK,
    SOURCE_RANK,
    bind_store_socket,
    create_transfer_group,
    destroy_group,
)

DEPTH = 4  # operations in flight per side, as the product's SEND_DEPTH and RECV_DEPTH
SESSION = "bare-gloo"
HOST = "127.0.0.1"


def plan(tensors: dict[str, torch.Tensor], bucket_bytes: int) -> list[Bucket]:
    return plan_buckets(build_manifest(tensors).specs, bucket_bytes)


class BareSource:
    """The source's side: packs the packed buckets once, then serves rounds."""

    def __init__(self, tensors: dict[str, torch.Tensor], bucket_bytes: int, streams: int) -> None:
        self.buckets = plan(tensors, bucket_bytes)
        self.streams = streams
        reader = BucketReader(tensors)
        self.data = []
        for bucket in self.buckets:
            buffer = None if bucket.direct else torch.empty(bucket.nbytes, dtype=torch.uint8)
            self.data.append(reader.read(bucket, buffer))

    def serve(self, tell_port, timeout_s: float) -> None:
        """One round: bind the store, tell the client its port, send every bucket."""
        listen = bind_store_socket(HOST)
        port = listen.getsockname()[1]
        tell_port(port)
        pg = create_transfer_group(
            "cpu", HOST, port, SOURCE_RANK, SESSION, timeout_s, timeout_s,
            listen_socket=listen, streams=self.streams,
        )
        try:
            _run(self.buckets, lambda b, i: pg.send([self.data[i]], CLIENT_RANK, bucket_tag(b)))
        finally:
            destroy_group(pg)


def receive(
    port: int, dest: dict[str, torch.Tensor], bucket_bytes: int, streams: int, timeout_s: float
) -> dict[str, float]:
    """The client's side of one round: seconds in all and in the group's setup."""
    buckets = plan(dest, bucket_bytes)
    scratch = [torch.empty(max_bucket_bytes([b for b in buckets if not b.direct]) or 1, dtype=torch.uint8)
               for _ in range(DEPTH)]
    t0 = time.perf_counter()
    pg = create_transfer_group("cpu", HOST, port, CLIENT_RANK, SESSION, timeout_s, timeout_s, streams=streams)
    setup_s = time.perf_counter() - t0
    reader = BucketReader(dest)
    try:

        def post(bucket: Bucket, i: int):
            if bucket.direct:
                target = reader.read(bucket, None)
            else:
                target = scratch[i % DEPTH][: bucket.nbytes]
            return pg.recv([target], SOURCE_RANK, bucket_tag(bucket))

        _run(buckets, post)
    finally:
        destroy_group(pg)
    return {"seconds": time.perf_counter() - t0, "setup_s": setup_s}


def _run(buckets: list[Bucket], post) -> None:
    """post(bucket, i) for every bucket, DEPTH in flight, each awaited in order."""
    in_flight: deque = deque()
    for i, bucket in enumerate(buckets):
        if len(in_flight) == DEPTH:
            in_flight.popleft().wait()
        in_flight.append(post(bucket, i))
    for work in in_flight:
        work.wait()
