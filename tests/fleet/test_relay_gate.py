"""Relay gating, in-process: a bucket is served only once verified, and an
upstream failure stops every downstream session (no network, no processes)."""

import threading

import pytest
import torch

from loader.config import TransferSettings
from loader.distribution.relay import NOT_RECEIVING, relay_server
from loader.transfer.buckets import plan_buckets
from loader.transfer.manifest import build_manifest
from loader.transfer.protocol import Ack

SETTINGS = TransferSettings(bucket_mb=1, bucket_timeout_s=0.3)
FP = "cd" * 32


def make_relay():
    tensors = {f"t{i}": torch.zeros(300_000) for i in range(3)}  # 1.2 MB each: direct
    server = relay_server(tensors, FP, 0, SETTINGS, host="127.0.0.1")
    relay = server.strategy
    plan = plan_buckets(build_manifest(tensors).specs, SETTINGS.bucket_bytes)
    ack = Ack(
        "ab" * 16, 1234, SETTINGS.bucket_bytes, server.plans.algorithm, ("00",) * len(plan), "ef"
    )
    return relay, plan, ack


def before_bucket(relay, plan, index):
    session = relay.open_session(SETTINGS.bucket_bytes, None)  # what a session does first
    relay.before_bucket(session, plan[index])


def test_not_receiving_refuses_and_has_no_checksums():
    relay, plan, ack = make_relay()
    assert relay.state == "attaching"
    with pytest.raises(RuntimeError):
        relay.open_session(SETTINGS.bucket_bytes, None)
    hello = type("H", (), {"rank": 0, "fingerprint": FP, "backend": "gloo"})
    hello.max_bucket_bytes = SETTINGS.bucket_bytes
    assert relay.refusal(hello, SETTINGS.bucket_bytes) == NOT_RECEIVING
    relay.transfer_started("up:1", ack, plan)
    assert relay.refusal(hello, SETTINGS.bucket_bytes) is None
    served = relay.open_session(SETTINGS.bucket_bytes, None).plan  # the root's checksums
    assert (served.buckets, served.checksums) == (plan, ack.checksums)


def test_unverified_bucket_is_never_released():
    relay, plan, ack = make_relay()
    relay.transfer_started("up:1", ack, plan)
    relay.bucket_verified("up:1", 0)
    relay.bucket_verified("other:1", 1)  # from a source we are not receiving from: ignored
    before_bucket(relay, plan, 0)  # verified: returns
    with pytest.raises(TimeoutError):
        before_bucket(relay, plan, 1)
    assert relay.buckets_forwarded == 1


def test_waiting_session_released_by_verification():
    relay, plan, ack = make_relay()
    relay.transfer_started("up:1", ack, plan)
    errors = []

    def session():
        try:
            before_bucket(relay, plan, 2)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    t = threading.Thread(target=session)
    t.start()
    relay.bucket_verified("up:1", 2)
    t.join(5)
    assert not t.is_alive() and errors == [] and relay.buckets_forwarded == 1


def test_upstream_failure_aborts_waiting_sessions():
    relay, plan, ack = make_relay()
    relay.transfer_started("up:1", ack, plan)
    relay.bucket_verified("up:1", 0)
    session = relay.open_session(SETTINGS.bucket_bytes, None)
    relay.attempt_failed("up:1", "checksum mismatch in bucket 1")
    assert relay.state == "attaching"
    with pytest.raises(RuntimeError, match="upstream failed"):
        relay.before_bucket(session, plan[0])  # even the bucket verified before the failure


def test_complete_relay_serves_everything():
    relay, plan, ack = make_relay()
    relay.transfer_started("up:1", ack, plan)
    relay.fetch_succeeded()
    relay.attempt_failed("up:1", "late")  # no effect once complete
    assert relay.state == "complete" and relay.verified_fraction == 1.0
    before_bucket(relay, plan, 2)
