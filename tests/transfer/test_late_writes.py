"""A failed source can never write into the destination tensors after its attempt ended.

The malicious source here sends wrong bytes in *every* bucket, slowly, and keeps sending
after the client gave up on it. Whatever the client does next (another source, a disk
load, serving as a relay), the tensors must end with exactly the verified weights.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from loader.distribution.relay import relay_server
from loader.transfer.bucket_sender import BucketSender
from loader.transfer.buckets import bucket_tag, message_spans
from loader.transfer.client import fetch_from_sources
from loader.transfer.process_group import CLIENT_RANK
from loader.transfer.resume import ResumeState
from tests.transfer.helpers import FAST, FINGERPRINT, empty_like_all, in_process_server

pytestmark = pytest.mark.timeout(180)

WRONG_BYTE = 0x5A


class LateCorruptSource(BucketSender):
    """Announces the true checksums (the server does), then sends WRONG_BYTE in every
    bucket (in each of its messages, as the ack announced them), one bucket every
    `delay_s`, and goes on after the client's failure (errors ignored)."""

    delay_s = 0.4

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.finished = threading.Event()
        self.sent_ok = 0

    def send(self, pg, buckets, device, before_bucket, item_messages=False):
        try:
            for bucket in buckets:
                for _, nbytes in message_spans(bucket, item_messages):
                    data = torch.full((nbytes,), WRONG_BYTE, dtype=torch.uint8)
                    try:
                        pg.send([data], CLIENT_RANK, bucket_tag(bucket)).wait()
                        self.sent_ok += 1
                    except Exception:
                        pass  # keep sending: the attacker does not stop because we did
                time.sleep(self.delay_s)
        finally:
            self.finished.set()


def big_tensors(seed: int) -> dict[str, torch.Tensor]:
    """Four tensors of >= 1/16 of FAST's 1 MiB bucket: each its own (direct) bucket."""
    g = torch.Generator().manual_seed(seed)
    return {f"w{i}": torch.randn(300_000 + i, generator=g) for i in range(4)}


def small_tensors(seed: int) -> dict[str, torch.Tensor]:
    """Many small tensors: packed buckets only."""
    g = torch.Generator().manual_seed(seed)
    return {f"s{i}": torch.randn(3000 + i, generator=g) for i in range(300)}


def assert_equal(dest, reference):
    for name, t in reference.items():
        assert torch.equal(dest[name], t), f"{name} holds bytes that were never verified"


def wait_finished(server) -> None:
    assert server.sender.finished.wait(120), "the corrupt source never finished sending"
    time.sleep(0.5)  # a receive completing just now still lands before we look


@pytest.mark.parametrize("make", [big_tensors, small_tensors], ids=["direct", "packed"])
def test_a_failed_source_cannot_overwrite_what_the_next_source_delivered(make):
    reference = make(1)
    dest = empty_like_all(reference)
    with in_process_server(make(1), sender_cls=LateCorruptSource) as bad:
        with in_process_server(make(1)) as good:
            outcome = fetch_from_sources([bad.endpoint, good.endpoint], FINGERPRINT, dest, 0, FAST)
            assert outcome.ok and outcome.peer == good.endpoint, outcome.failures
            assert "checksum mismatch" in outcome.failures[0][1]
        wait_finished(bad)
    assert_equal(dest, reference)


@pytest.mark.parametrize("make", [big_tensors, small_tensors], ids=["direct", "packed"])
def test_a_failed_source_cannot_overwrite_the_disk_fallback(make):
    reference = make(2)
    dest = empty_like_all(reference)
    with in_process_server(make(2), sender_cls=LateCorruptSource) as bad:
        outcome = fetch_from_sources([bad.endpoint], FINGERPRINT, dest, 0, FAST)
        assert not outcome.ok
        for name, t in reference.items():  # what the disk fallback does
            dest[name].copy_(t)
        wait_finished(bad)
    assert_equal(dest, reference)


def test_resumed_buckets_stay_verified_after_a_failed_source():
    """The good source's verified buckets are kept by the resume state; a failing source
    in between must not change them behind its back."""
    reference = big_tensors(3)
    dest = empty_like_all(reference)
    resume = ResumeState()
    with in_process_server(big_tensors(3)) as good:
        first = fetch_from_sources([good.endpoint], FINGERPRINT, dest, 0, FAST, resume=resume)
    assert first.ok
    held = resume.verified_buckets
    with in_process_server(big_tensors(3), sender_cls=LateCorruptSource) as bad:
        # the bad source is offered nothing to skip that it did not announce: it sends all
        resume_for_bad = ResumeState()
        second = fetch_from_sources([bad.endpoint], FINGERPRINT, dest, 0, FAST, resume=resume_for_bad)
        assert not second.ok
        wait_finished(bad)
    assert resume.verified_buckets == held
    assert_equal(dest, reference)


def test_a_relay_that_falls_back_to_disk_serves_only_the_disk_bytes():
    reference = big_tensors(4)
    dest = empty_like_all(reference)
    relay = relay_server(dest, FINGERPRINT, 0, FAST, host="127.0.0.1")
    relay.start()
    try:
        with in_process_server(big_tensors(4), sender_cls=LateCorruptSource) as bad:
            outcome = fetch_from_sources(
                [bad.endpoint], FINGERPRINT, dest, 0, FAST, observer=relay.strategy
            )
            assert not outcome.ok
            for name, t in reference.items():  # the disk fallback
                dest[name].copy_(t)
            relay.strategy.fetch_succeeded()
            wait_finished(bad)
        downstream = empty_like_all(reference)
        served = fetch_from_sources([relay.endpoint], FINGERPRINT, downstream, 0, FAST)
        assert served.ok, served.failures
        assert_equal(downstream, reference)
        assert_equal(dest, reference)
    finally:
        relay.stop()
