"""Relay gating, in-process: a bucket is served only once verified; after an upstream
failure, downstream sessions go on only if the next attempt resumes the same transfer
(no network, no processes)."""

import threading
from dataclasses import replace

import pytest
import torch

from loader.config import TransferSettings
from loader.distribution.relay import NOT_RECEIVING, relay_server
from loader.transfer.buckets import plan_buckets
from loader.transfer.manifest import build_manifest
from loader.transfer.protocol import Ack

SETTINGS = TransferSettings(bucket_mb=1, bucket_timeout_s=0.3, relay_failover_s=0.2)
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


def failed_after_verifying(relay, plan, ack, indices=(0,)):
    """The relay's upstream verified `indices`, then failed; a session waits on it."""
    relay.transfer_started("up:1", ack, plan)
    for index in indices:
        relay.bucket_verified("up:1", index)
    session = relay.open_session(SETTINGS.bucket_bytes, None)
    relay.attempt_failed("up:1", "connection reset")
    return session


def wait_in_thread(relay, session, bucket):
    errors = []

    def run():
        try:
            relay.before_bucket(session, bucket)
        except Exception as exc:
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    return t, errors


def test_upstream_failure_keeps_sessions_but_takes_no_new_clients():
    relay, plan, ack = make_relay()
    session = failed_after_verifying(relay, plan, ack)
    assert relay.state == "attaching" and relay.upstream is None  # not offered meanwhile
    hello = type("H", (), {"rank": 0, "fingerprint": FP, "backend": "gloo"})
    assert relay.refusal(hello, SETTINGS.bucket_bytes) == NOT_RECEIVING
    relay.before_bucket(session, plan[0])  # verified before the failure: still served
    relay.bucket_verified("up:1", 1)  # a late word from the failed attempt: ignored
    relay.attempt_failed("up:1", "again")  # no effect: already waiting for the next
    with pytest.raises(RuntimeError, match="none resumed within 0.2s"):  # and none came
        relay.before_bucket(session, plan[1])


def test_next_attempt_resuming_the_same_transfer_releases_the_waiting_session():
    relay, plan, ack = make_relay()
    session = failed_after_verifying(relay, plan, ack)
    t, errors = wait_in_thread(relay, session, plan[1])
    relay.transfer_started("up:2", replace(ack, skip=frozenset({0})), plan)
    relay.bucket_verified("up:2", 1)
    t.join(5)
    assert not t.is_alive() and errors == []
    assert relay.state == "receiving" and relay.upstream == "up:2"
    relay.before_bucket(session, plan[0])  # what it had verified stays verified


@pytest.mark.parametrize(
    "change",
    [
        {"checksums": ("01",) * 3},  # other checksums: other weights, or another key
        {"skip": frozenset()},  # it would receive bucket 0 again, which sessions read
    ],
    ids=["other-checksums", "resends-a-verified-bucket"],
)
def test_next_attempt_of_another_transfer_aborts_the_sessions_first(change):
    relay, plan, ack = make_relay()
    session = failed_after_verifying(relay, plan, ack)
    t, errors = wait_in_thread(relay, session, plan[1])
    relay.transfer_started("up:2", replace(ack, **change), plan)
    t.join(5)
    assert not t.is_alive() and len(errors) == 1 and "re-attach" in str(errors[0])
    with pytest.raises(RuntimeError, match="invalidated"):
        relay.before_bucket(session, plan[0])  # even the bucket verified before
    assert relay.state == "receiving" and relay.verified_fraction == 0.0


def test_invalidate_aborts_waiting_sessions():
    relay, plan, ack = make_relay()
    session = failed_after_verifying(relay, plan, ack)
    relay.invalidate("loading from disk")
    assert relay.state == "attaching"
    with pytest.raises(RuntimeError, match="invalidated"):
        relay.before_bucket(session, plan[0])


def test_complete_relay_serves_everything():
    relay, plan, ack = make_relay()
    relay.transfer_started("up:1", ack, plan)
    relay.fetch_succeeded()
    relay.attempt_failed("up:1", "late")  # no effect once complete
    assert relay.state == "complete" and relay.verified_fraction == 1.0
    before_bucket(relay, plan, 2)
