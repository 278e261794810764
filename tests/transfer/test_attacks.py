"""What an attacker on the network can do to a weight server, and what it gets.

The attacker can reach the source's ports (control socket, per-session store port) but
does not hold the session id that travels inside the authenticated control channel.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
import zmq

from loader.config import TransferSettings
from loader.transfer import protocol, served_plans
from loader.transfer import server as server_module
from loader.transfer.admission import max_pending_per_peer
from loader.transfer.client import fetch_from_sources
from loader.transfer.manifest import build_manifest
from loader.transfer.process_group import CLIENT_RANK
from loader.transfer.served_plans import BUCKET_SIZES, choose_bucket_bytes
from tests.transfer.helpers import (
    FAST,
    FINGERPRINT,
    empty_like_all,
    in_process_server,
    make_tensors,
)

pytestmark = pytest.mark.timeout(120)


def raw_hello(endpoint: str, tensors, max_bucket_bytes: int = 1 << 20) -> tuple[zmq.Socket, dict]:
    """Send a well-formed hello from a bare socket; return the socket and the reply."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://{endpoint}")
    hello = protocol.hello_message(
        FINGERPRINT, 0, build_manifest(tensors), "gloo", max_bucket_bytes
    )
    sock.send(protocol.encode(hello))
    assert sock.poll(10_000), "no reply"
    return sock, protocol.decode(sock.recv(), 1 << 26)


def test_a_peer_without_the_session_id_cannot_join_the_transfer_group(monkeypatch):
    """Between the ack and the client's own rendezvous, an attacker who reaches the store
    port tries to register as the client rank, with the prefix vLLM's helper would use
    (tcp://host:port, which anyone can compute) and with a guess. It must get nothing,
    and the real client must still get the weights."""
    from datetime import timedelta

    from torch.distributed import PrefixStore, TCPStore

    import loader.transfer.receive_pipeline as receive_module
    from loader.transfer.process_group import _gloo_group

    attacker: dict = {}
    real_wait = receive_module.wait_for_store

    def attack_first(host, port, timeout_s, cancelled=lambda: False):
        real_wait(host, port, timeout_s, cancelled)
        for prefix in (f"tcp://{host}:{port}", "netloader/" + "0" * 32 + "/"):
            try:
                store = TCPStore(host, port, 2, False, timedelta(seconds=2), wait_for_workers=False)
                pg = _gloo_group(PrefixStore(prefix, store), CLIENT_RANK, timedelta(seconds=2))
                buf = torch.zeros(16, dtype=torch.uint8)
                pg.recv([buf], 0, 0).wait()
                attacker[prefix] = "received data"
            except Exception as exc:  # the expected outcome: nobody answers that prefix
                attacker[prefix] = f"failed: {type(exc).__name__}"

    monkeypatch.setattr(receive_module, "wait_for_store", attack_first)
    source = make_tensors(7, small=5, big_numel=50_000)
    with in_process_server(source) as server:
        dest = empty_like_all(source)
        outcome = fetch_from_sources([server.endpoint], FINGERPRINT, dest, 0, FAST)
    assert len(attacker) == 2 and all(v.startswith("failed") for v in attacker.values()), attacker
    assert outcome.ok, outcome.failures
    for name, t in source.items():
        assert torch.equal(dest[name], t), name


def test_a_hello_that_never_connects_holds_its_slot_only_for_the_setup_timeout(caplog):
    settings = TransferSettings(
        **{**FAST.__dict__, "max_concurrent_clients": 1, "pg_setup_timeout_s": 1.0,
           "bucket_timeout_s": 60.0}
    )
    source = make_tensors(8, small=3, big_numel=1000)
    from loader.transfer.server import WeightServer

    server = WeightServer(source, FINGERPRINT, 0, settings, host="127.0.0.1")
    server.start()
    try:
        sock, reply = raw_hello(server.endpoint, source)
        assert reply["type"] == "ack"  # the slot is taken, and the attacker never connects
        _, second = raw_hello(server.endpoint, source)
        assert second["type"] == "busy"
        deadline = time.monotonic() + 20  # far below bucket_timeout_s (60 s)
        while server.active_clients and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server.active_clients == 0, "the never-connecting session still holds the slot"
        # ended by the setup wait (1 s), not by the 60 s bucket timeout
        assert any("wait timeout after 1000ms" in r.getMessage() for r in caplog.records)
        dest = empty_like_all(source)
        assert fetch_from_sources([server.endpoint], FINGERPRINT, dest, 0, settings).ok
        sock.close()
    finally:
        server.stop()


def test_sessions_still_setting_up_are_capped_per_peer_address(monkeypatch):
    """One address cannot hold every slot with hellos it never follows up."""
    source = make_tensors(9, small=3, big_numel=1000)
    never = threading.Event()

    def stalled_group(*args, **kwargs):  # the rendezvous never completes
        never.wait(30)
        raise TimeoutError("stalled")

    monkeypatch.setattr(server_module, "create_transfer_group", stalled_group)
    settings = TransferSettings(**{**FAST.__dict__, "max_concurrent_clients": 4})
    cap = max_pending_per_peer(4)
    assert cap == 3 and max_pending_per_peer(2) == 2 and max_pending_per_peer(16) == 15
    from loader.transfer.server import WeightServer

    server = WeightServer(source, FINGERPRINT, 0, settings, host="127.0.0.1")
    server.start()
    try:
        replies = [raw_hello(server.endpoint, source)[1]["type"] for _ in range(cap + 2)]
        assert replies == ["ack"] * cap + ["busy", "busy"]  # one slot stays for other hosts
        _, last = raw_hello(server.endpoint, source)
        assert "still setting up" in last["reason"]
    finally:
        never.set()
        server.stop()


def test_bucket_sizes_come_from_a_fixed_set():
    own = 64 << 20
    assert choose_bucket_bytes(own, own) == own
    assert choose_bucket_bytes(own, (64 << 20) - 1) == 16 << 20
    assert choose_bucket_bytes(own, 5 << 20) == 4 << 20
    assert choose_bucket_bytes(own, (1 << 20) - 1) is None
    assert choose_bucket_bytes(3 << 20, 1 << 30) == 3 << 20  # a source's own odd size
    chosen = {choose_bucket_bytes(own, n) for n in range(1 << 20, 1 << 27, 77_777)}
    assert chosen <= set(BUCKET_SIZES)


def test_arbitrary_client_bucket_sizes_do_not_make_the_source_hash_again_and_again(monkeypatch):
    source = make_tensors(10, small=3, big_numel=1000)
    settings = TransferSettings(**{**FAST.__dict__, "bucket_mb": 64})
    from loader.transfer.server import WeightServer

    server = WeightServer(source, FINGERPRINT, 0, settings, host="127.0.0.1")
    hashed: list[int] = []
    real = served_plans.plan_buckets

    def counting(specs, bucket_bytes):  # planned (and hashed) only when not cached
        hashed.append(bucket_bytes)
        return real(specs, bucket_bytes)

    monkeypatch.setattr(served_plans, "plan_buckets", counting)
    server.start()
    try:
        for size in range(1 << 20, 100 << 20, 3_333_333):  # 30 different sizes
            sock, reply = raw_hello(server.endpoint, source, size)
            sock.close()
            if reply["type"] == "ack":
                assert reply["bucket_bytes"] in set(BUCKET_SIZES) | {64 << 20}
    finally:
        server.stop()
    assert len(hashed) == len(set(hashed)) <= len(BUCKET_SIZES)


def test_a_source_that_cannot_set_up_says_so_at_once(monkeypatch):
    """Its group creation raises (e.g. a backend missing on that host): the client hears
    the reason over the control channel instead of waiting out pg_setup_timeout_s."""

    def broken_group(*args, **kwargs):
        raise RuntimeError("HCCL is not available on this host")

    monkeypatch.setattr(server_module, "create_transfer_group", broken_group)
    slow_setup = TransferSettings(**{**FAST.__dict__, "pg_setup_timeout_s": 300.0})
    source = make_tensors(11, small=3, big_numel=1000)
    with in_process_server(source) as server:
        outcome = fetch_from_sources([server.endpoint], FINGERPRINT, empty_like_all(source), 0, slow_setup)
    [(_, reason)] = outcome.failures
    assert reason == (
        "source failed to set up the transfer: RuntimeError: HCCL is not available on this host"
    )
