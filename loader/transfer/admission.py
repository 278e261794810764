"""Whether a client's hello starts a session: refused (it asks for other weights), busy
(for now: no slot, too many of its sessions still setting up, a hold such as vLLM's
warm-up, no device memory) or admitted."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

import torch

from loader.config import TransferSettings
from loader.transfer import protocol
from loader.transfer.device import session_device_bytes
from loader.transfer.manifest import Manifest


def max_pending_per_peer(max_clients: int) -> int:
    """Sessions whose process group is not up yet, per client address: a peer that sends
    hellos and never connects holds at most this many slots, each for pg_setup_timeout_s,
    and never all of them once there are three or more; two instances on one host can
    always start together."""
    return max(2, max_clients - 1)


def free_device_bytes(device: torch.device) -> int | None:
    """Free memory of an accelerator; None on the CPU (no limit checked)."""
    if device.type == "cpu":
        return None
    return torch.accelerator.get_memory_info(device)[0]


class RunningSession(Protocol):
    peer_address: str
    group_up: bool  # process group set up: no longer counts as pending


class Admission:
    """The decisions for one server: what it serves (rank, fingerprint, backend, manifest)
    and how many sessions it runs at once (`settings.max_concurrent_clients`)."""

    def __init__(
        self,
        rank: int,
        fingerprint: str,
        backend: str,
        manifest: Manifest,
        settings: TransferSettings,
        device: torch.device,
    ) -> None:
        self._rank = rank
        self._fingerprint = fingerprint
        self._backend = backend
        self._manifest = manifest
        self._settings = settings
        self._device = device

    def refusal(self, hello: protocol.Hello) -> str | None:
        """Why this source can never serve the client, or None."""
        if hello.rank != self._rank:
            return f"rank mismatch: source serves rank {self._rank}, client is rank {hello.rank}"
        if hello.fingerprint != self._fingerprint:
            return (
                f"fingerprint mismatch: source {self._fingerprint[:16]}, "
                f"client {hello.fingerprint[:16]}"
            )
        if hello.backend != self._backend:
            return f"backend mismatch: source uses {self._backend}, client {hello.backend}"
        difference = hello.manifest.first_difference(self._manifest)
        if difference:
            return f"manifest mismatch: {difference}"
        return None

    def busy(
        self,
        running: Iterable[RunningSession],
        peer_address: str,
        bucket_bytes: int,
        hold: Callable[[], str | None] | None,
    ) -> str | None:
        """Why a new session from `peer_address` must wait, or None to admit it. `running`
        are the sessions in progress; `hold()` may return a reason to refuse for now."""
        running = list(running)
        max_clients = self._settings.max_concurrent_clients
        pending = sum(1 for s in running if not s.group_up and s.peer_address == peer_address)
        if len(running) >= max_clients:
            return f"source busy ({len(running)} transfers running)"
        if pending >= max_pending_per_peer(max_clients):
            return f"source busy ({pending} sessions from {peer_address} still setting up)"
        return (hold and hold()) or self._memory_refusal(bucket_bytes)

    def _memory_refusal(self, bucket_bytes: int) -> str | None:
        """On an accelerator a session needs staging buffers and communicator memory on
        the device, which vLLM may have given to the KV cache: refuse rather than fail."""
        free = free_device_bytes(self._device)
        need = session_device_bytes(self._backend, bucket_bytes)
        if free is None or free >= need:
            return None
        return f"source busy (device memory: {free >> 20} MiB free, a session needs {need >> 20} MiB)"
