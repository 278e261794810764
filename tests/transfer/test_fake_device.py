"""The transfer path on a fake asynchronous accelerator (tests/transfer/fake_device.py):
`wait()` returns before the data is there, copies land late, an abort lands garbage.
Success, timeouts, a source that aborts mid-transfer, resume and relaying must all end
with exactly the source's bytes, on the transfer stream, never on inference's."""

from __future__ import annotations

import time

import pytest
import torch

from loader.config import TransferSettings
from loader.distribution.relay import relay_server
from loader.transfer.bucket_sender import BucketSender
from loader.transfer.client import fetch_from_sources
from loader.transfer.process_group import destroy_group
from loader.transfer.resume import ResumeState
from loader.transfer.serving_strategy import FixedTensors
from tests.transfer import fake_device
from tests.transfer.helpers import (
    FAST,
    FINGERPRINT,
    empty_like_all,
    in_process_server,
    make_tensors,
)

pytestmark = pytest.mark.timeout(120)


def assert_equal(dest, reference):
    for name, t in reference.items():
        assert torch.equal(dest[name], t), name


def assert_stream_discipline(log):
    """Every thread that copied set its device first and copied on the transfer stream."""
    copiers = {thread: events for thread, events in log.items() if any(e.startswith("copy") for e in events)}
    assert copiers, "no device copies were recorded"
    for thread, events in copiers.items():
        assert events[0] == "set_device", (thread, events[:3])
        assert "copy@default" not in events, thread


def test_a_transfer_ends_with_the_source_bytes_in_place(monkeypatch):
    fake = fake_device.install(monkeypatch)
    source = make_tensors(21, small=30, big_numel=400_000)
    dest = empty_like_all(source)
    with in_process_server(source) as server:
        outcome = fetch_from_sources([server.endpoint], FINGERPRINT, dest, 0, FAST)
    assert outcome.ok, outcome.failures
    assert_equal(dest, source)  # at once: the late copies were waited for
    assert_stream_discipline(fake.log)
    assert any("sync" in events for events in fake.log.values())


def fetch_after_a_failing_source(bad_cls, seed: int, bucket_timeout_s: float):
    """A source sending with `bad_cls`, then a good one; returns the outcome, the destination (after
    the failed attempt's late garbage had time to land) and the source's tensors."""
    settings = TransferSettings(**{**FAST.__dict__, "bucket_timeout_s": bucket_timeout_s})
    source = make_tensors(seed, small=10, big_numel=300_000)
    dest = empty_like_all(source)
    with in_process_server(source, sender_cls=bad_cls) as bad:
        with in_process_server(source) as good:
            outcome = fetch_from_sources([bad.endpoint, good.endpoint], FINGERPRINT, dest, 0, settings)
    assert outcome.ok and outcome.peer == good.endpoint, outcome.failures
    time.sleep(2 * fake_device.LATE_S)  # the aborted receives land their garbage now
    return outcome, dest, source


class SilentSource(BucketSender):
    def send(self, pg, buckets, device, before_bucket, item_messages=False):
        time.sleep(30)  # never sends: the client's receives never complete


def test_a_bucket_that_never_arrives_times_out_per_bucket_and_the_next_source_serves(monkeypatch):
    fake_device.install(monkeypatch)
    outcome, dest, source = fetch_after_a_failing_source(SilentSource, 22, 1.5)
    # the per-bucket deadline fired (not the silent source's 30 s, not a whole-transfer one)
    assert outcome.failures[0][1] == "bucket 0 timed out after 1.5s", outcome.failures
    assert_equal(dest, source)


class AbortingSource(BucketSender):
    """Sends two buckets, then aborts its group (a crash, as the client sees it)."""

    def send(self, pg, buckets, device, before_bucket, item_messages=False):
        super().send(pg, buckets[:2], device, before_bucket, item_messages)
        destroy_group(pg)
        raise RuntimeError("source aborted")


def test_a_source_that_aborts_mid_transfer_leaves_no_garbage(monkeypatch):
    fake_device.install(monkeypatch)
    outcome, dest, source = fetch_after_a_failing_source(AbortingSource, 23, 2.0)
    assert 0 < outcome.resumed_bytes < outcome.bytes  # the two delivered buckets were kept
    assert_equal(dest, source)


def test_resume_across_sources_on_the_fake_device(monkeypatch):
    fake_device.install(monkeypatch)
    source = make_tensors(24, small=10, big_numel=300_000)
    dest = empty_like_all(source)
    resume = ResumeState()
    short = TransferSettings(**{**FAST.__dict__, "bucket_timeout_s": 2.0})
    with in_process_server(source, sender_cls=AbortingSource) as aborting:
        first = fetch_from_sources([aborting.endpoint], FINGERPRINT, dest, 0, short, resume=resume)
    assert not first.ok and resume.verified_buckets == 2
    with in_process_server(source) as good:
        second = fetch_from_sources([good.endpoint], FINGERPRINT, dest, 0, short, resume=resume)
    assert second.ok and 0 < second.resumed_bytes < second.bytes
    assert_equal(dest, source)


def test_a_relay_forwards_only_bytes_that_have_landed(monkeypatch):
    """The relay is told a bucket is verified only after its copy into place ran: a
    downstream that starts while the relay receives gets exactly the root's bytes."""
    fake = fake_device.install(monkeypatch)
    source = make_tensors(25, small=30, big_numel=400_000)
    middle = empty_like_all(source)
    relay = relay_server(middle, FINGERPRINT, 0, FAST, host="127.0.0.1")
    relay.start()
    try:
        with in_process_server(source, strategy=_SlowSource()) as root:
            import threading

            done = {}
            upstream = threading.Thread(
                target=lambda: done.setdefault(
                    "middle", fetch_from_sources([root.endpoint], FINGERPRINT, middle, 0, FAST, observer=relay.strategy)
                )
            )
            upstream.start()
            deadline = time.monotonic() + 30
            while relay.state != "receiving" and time.monotonic() < deadline:
                time.sleep(0.01)
            downstream = empty_like_all(source)
            outcome = fetch_from_sources([relay.endpoint], FINGERPRINT, downstream, 0, FAST)
            upstream.join(60)
        assert done["middle"].ok and outcome.ok, (done, outcome.failures)
        assert_equal(downstream, source)
        assert_equal(middle, source)
        assert_stream_discipline(fake.log)
    finally:
        relay.stop()


class _SlowSource(FixedTensors):
    def before_bucket(self, session, bucket):
        time.sleep(0.02)
