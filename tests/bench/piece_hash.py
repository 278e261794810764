"""Does hashing a bucket piece by piece, as each piece arrives, make the checksum cheaper?

    python -m tests.bench.piece_hash [--rounds 3]

128 buckets of 8 MiB (1 GiB) over a bare Gloo pair (the product's create_transfer_group,
2 streams, 4 buckets in flight) into one destination, each bucket received whole or in
8 pieces of 1 MiB; a helper thread runs the NH32T2 level-1 kernel over each bucket (or
piece) as soon as its receive completed. Prints GiB/s and the helper's CPU seconds per
GiB for every round (the first round of each setting pays the source's first touch)
and, for reference, the kernel on bytes in cache and on bytes from memory.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from loader.transfer import nh_hash
from loader.transfer.checksum import PUBLIC_KEY
from loader.transfer.process_group import (
    CLIENT_RANK,
    SOURCE_RANK,
    bind_store_socket,
    create_transfer_group,
    destroy_group,
)

HOST = "127.0.0.1"
BUCKETS = 128
BUCKET_BYTES = 8 << 20
DEPTH = 4  # buckets in flight, as the product's SEND_DEPTH and RECV_DEPTH
STREAMS = 2
TIMEOUT_S = 60.0


def _source(ports, pieces: int, rounds: int) -> None:
    data = torch.randint(0, 255, (BUCKETS * BUCKET_BYTES,), dtype=torch.uint8)
    step = BUCKET_BYTES // pieces
    for r in range(rounds):
        listen = bind_store_socket(HOST)
        ports.put(listen.getsockname()[1])
        pg = create_transfer_group(
            "cpu", HOST, listen.getsockname()[1], SOURCE_RANK, f"pieces-{r}", TIMEOUT_S,
            TIMEOUT_S, listen_socket=listen, streams=STREAMS,
        )
        in_flight: deque = deque()
        for op in range(BUCKETS * pieces):
            if len(in_flight) == DEPTH * pieces:
                in_flight.popleft().wait()
            in_flight.append(pg.send([data[op * step : (op + 1) * step]], CLIENT_RANK, op))
        for work in in_flight:
            work.wait()
        destroy_group(pg)


def _nh32t2_level1():
    """The NH32T2 block kernel as (blocks as uint8, out) -> None, under the public key."""
    key_a, key_b, _ = nh_hash._nh32_keys(PUBLIC_KEY)
    kernel = nh_hash._kernel(1)
    return lambda blocks, out: kernel(blocks.view("<u4"), key_a, key_b, out)


def _receive(port: int, pieces: int, dest: torch.Tensor, r: int) -> tuple[float, float]:
    """One round: (seconds, CPU seconds of the hashing thread)."""
    level1 = _nh32t2_level1()
    out = np.empty(2 * BUCKETS * BUCKET_BYTES // nh_hash.BLOCK_BYTES, dtype=np.uint64)
    step = BUCKET_BYTES // pieces
    hash_cpu = [0.0]

    def hash_range(lo: int) -> None:
        t = time.thread_time()
        block = lo // nh_hash.BLOCK_BYTES
        level1(dest[lo : lo + step].numpy(), out[2 * block : 2 * (block + step // nh_hash.BLOCK_BYTES)])
        hash_cpu[0] += time.thread_time() - t

    hasher = ThreadPoolExecutor(1)
    pg = create_transfer_group(
        "cpu", HOST, port, CLIENT_RANK, f"pieces-{r}", TIMEOUT_S, TIMEOUT_S, streams=STREAMS
    )
    t0 = time.perf_counter()
    in_flight: deque = deque()
    hashed = []
    for op in range(BUCKETS * pieces):
        lo = op * step
        in_flight.append((lo, pg.recv([dest[lo : lo + step]], SOURCE_RANK, op)))
        if len(in_flight) == DEPTH * pieces:
            lo, work = in_flight.popleft()
            work.wait()
            hashed.append(hasher.submit(hash_range, lo))
    for lo, work in in_flight:
        work.wait()
        hashed.append(hasher.submit(hash_range, lo))
    for future in hashed:
        future.result()
    seconds = time.perf_counter() - t0
    destroy_group(pg)
    hasher.shutdown()
    return seconds, hash_cpu[0]


def _kernel_alone(size: int) -> float:
    """CPU seconds per GiB of the kernel over `size` bytes, again and again (in cache
    when `size` fits the cache)."""
    level1 = _nh32t2_level1()
    data = np.random.randint(0, 255, size, dtype=np.uint8)
    out = np.empty(2 * size // nh_hash.BLOCK_BYTES, dtype=np.uint64)
    repeats = max(1, (1 << 30) // size)
    t = time.thread_time()
    for _ in range(repeats):
        level1(data, out)
    return (time.thread_time() - t) / (repeats * size / (1 << 30))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    nh_hash.warm_up(nh_hash.nh32t2_digest)
    gib = BUCKETS * BUCKET_BYTES / (1 << 30)
    dest = torch.ones(BUCKETS * BUCKET_BYTES, dtype=torch.uint8)
    ctx = mp.get_context("fork")
    for pieces in (1, 8, 1, 8):
        ports = ctx.Queue()
        source = ctx.Process(target=_source, args=(ports, pieces, args.rounds))
        source.start()
        rounds = [_receive(ports.get(timeout=TIMEOUT_S), pieces, dest, r) for r in range(args.rounds)]
        source.join(TIMEOUT_S)
        shown = "  ".join(f"{gib / s:.2f} GiB/s hash {h / gib:.3f} CPU-s/GiB" for s, h in rounds)
        print(f"{pieces} piece(s) per bucket: {shown}", flush=True)
    print(f"kernel alone: 1 MiB in cache {_kernel_alone(1 << 20):.3f}, "
          f"256 MiB from memory {_kernel_alone(256 << 20):.3f} CPU-s/GiB")


if __name__ == "__main__":
    main()
