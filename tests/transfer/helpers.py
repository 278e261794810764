"""Shared helpers for transfer tests: deterministic tensors and a source in this process
or in a subprocess."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch

from loader.config import TransferSettings

FINGERPRINT = "ab" * 32
# Short enough to keep the fault tests quick, long enough for a source process on a
# machine whose load average is far above its 2 cores.
FAST = TransferSettings(
    connect_timeout_s=3.0,
    handshake_timeout_s=8.0,
    pg_setup_timeout_s=10.0,
    bucket_timeout_s=10.0,
    bucket_mb=1,
    progress_interval_s=0.5,
)


def make_tensors(seed: int = 0, small: int = 40, big_numel: int = 600_000) -> dict[str, torch.Tensor]:
    """A mix that exercises packing and direct sends, several dtypes and a tied pair."""
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for i in range(small):
        tensors[f"layer{i}.weight"] = torch.randn(97 + i, 3, generator=g)
        tensors[f"layer{i}.bias"] = torch.randn(5, generator=g).to(torch.bfloat16)
    tensors["scalar"] = torch.tensor(3.5)
    tensors["empty"] = torch.empty(0, 4)
    tensors["counts"] = torch.randint(0, 1000, (1234,), generator=g, dtype=torch.int64)
    tensors["embed.weight"] = torch.randn(big_numel, generator=g)
    tensors["lm_head.weight"] = tensors["embed.weight"]  # tied
    tensors["big2"] = torch.randn(big_numel // 2 + 17, generator=g).to(torch.float16)
    return tensors


def empty_like_all(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Destination tensors with the same aliasing as `tensors`."""
    out: dict[str, torch.Tensor] = {}
    by_ptr: dict[int, str] = {}
    for name, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in by_ptr:
            out[name] = out[by_ptr[ptr]]
            continue
        by_ptr[ptr] = name
        out[name] = torch.full_like(t, 0) if t.dtype != torch.bool else torch.zeros_like(t)
    return out


@contextlib.contextmanager
def in_process_server(
    tensors, fingerprint: str = FINGERPRINT, strategy=None, sender_cls=None, keys=None, **attrs
) -> Iterator:
    """A started WeightServer on loopback in this process, stopped on exit, serving with
    `strategy` and sending with `sender_cls` (test faults; default: the real ones), with
    CURVE `keys` if given; `attrs` are set on it before it starts (test knobs)."""
    from loader.transfer.bucket_sender import BucketSender
    from loader.transfer.server import WeightServer

    server = WeightServer(
        tensors, fingerprint, 0, FAST, keys=keys, host="127.0.0.1", strategy=strategy,
        sender_cls=sender_cls or BucketSender,
    )
    for key, value in attrs.items():
        setattr(server, key, value)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class SourceSpec:
    seed: int = 0
    fingerprint: str = FINGERPRINT
    settings: TransferSettings = field(default_factory=lambda: FAST)
    # "kill_mid_transfer" | "freeze_mid_transfer" | "hang_after_ack" | "corrupt_after_checksums"
    fault: str | None = None
    secret_file: str | None = None
    tensor_kwargs: dict = field(default_factory=dict)


def _source_main(spec: SourceSpec, endpoint_queue, stop_conn) -> None:
    import loader.transfer.server as server_mod
    from loader.transfer.buckets import BucketReader

    tensors = make_tensors(spec.seed, **spec.tensor_kwargs)
    keys = None
    if spec.secret_file:
        from mesh.security import load_cluster_keys

        keys = load_cluster_keys(spec.secret_file)
    server = server_mod.WeightServer(
        tensors, spec.fingerprint, 0, spec.settings, keys=keys, host="127.0.0.1"
    )
    server.start()
    server.wait_ready(60)
    if spec.fault in ("kill_mid_transfer", "freeze_mid_transfer"):
        # killed: the kernel closes its connections; frozen (SIGSTOP): nothing at all
        # reaches the client any more, as from a crashed host
        original, sent = BucketReader.messages, [0]
        stop = signal.SIGKILL if spec.fault == "kill_mid_transfer" else signal.SIGSTOP

        def read_then_die(self, *args, **kwargs):
            sent[0] += 1
            if sent[0] > 5:
                os.kill(os.getpid(), stop)
            return original(self, *args, **kwargs)

        BucketReader.messages = read_then_die
    elif spec.fault == "hang_after_ack":
        server.sender.send = lambda *args, **kwargs: time.sleep(3600)
    elif spec.fault == "corrupt_after_checksums":
        tensors["layer3.weight"][1, 1] += 1.0
    endpoint_queue.put(server.endpoint)
    stop_conn.poll(300)  # returns when the parent closes its end (or sends anything)
    server.stop()


class SourceProcess:
    """A WeightServer in a spawned process, stopped on exit."""

    def __init__(self, spec: SourceSpec | None = None, **changes) -> None:
        self.spec = replace(spec or SourceSpec(), **changes)
        ctx = mp.get_context("spawn")
        self._queue = ctx.Queue()
        # a pipe, not an Event: Event.set() blocks forever if the child was SIGKILLed
        self._stop, child_end = ctx.Pipe()
        self.process = ctx.Process(
            target=_source_main, args=(self.spec, self._queue, child_end), daemon=True
        )

    def __enter__(self) -> str:
        self.process.start()
        self.endpoint = self._queue.get(timeout=120)
        return self.endpoint

    def __exit__(self, *exc) -> None:
        if self.spec.fault == "freeze_mid_transfer":
            self.process.kill()  # a stopped process never reads its stop pipe
        self._stop.close()
        self.process.join(15)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
