"""An interrupted transfer continues where it stopped: only unverified buckets move again."""

import pytest
import torch

from loader.transfer import protocol
from loader.transfer.buckets import byte_view
from loader.transfer.client import fetch_from_sources
from loader.transfer.device import device_for
from loader.transfer.resume import ResumeState, SourceFailure
from loader.transfer.serving_strategy import FixedTensors
from tests.transfer.helpers import (
    FAST,
    FINGERPRINT,
    empty_like_all,
    in_process_server,
    make_tensors,
)

pytestmark = pytest.mark.timeout(120)


class CountingServer(FixedTensors):
    """Records the buckets it sends; can corrupt one bucket's bytes after its checksum."""

    def __init__(self, corrupt_bucket: int | None = None):
        self.corrupt_bucket = corrupt_bucket
        self.sent: list[int] = []

    def attach(self, server) -> None:
        super().attach(server)
        self._tensors = server.tensors

    def before_bucket(self, session, bucket) -> None:
        self.sent.append(bucket.index)
        if bucket.index == self.corrupt_bucket:  # in flight, as a bad link would
            item = bucket.items[0]
            byte_view(self._tensors[item.name])[item.tensor_offset] ^= 0x40


def test_second_source_sends_only_the_buckets_the_first_did_not_deliver():
    source = make_tensors(3, small=40, big_numel=600_000)
    reference = make_tensors(3, small=40, big_numel=600_000)  # the same weights, uncorrupted
    dest = empty_like_all(source)
    resume = ResumeState()
    with in_process_server(source, strategy=CountingServer(corrupt_bucket=2)) as bad:
        first = fetch_from_sources([bad.endpoint], FINGERPRINT, dest, 0, FAST, resume=resume)
    assert not first.ok and "checksum mismatch in bucket 2" in first.failures[0][1]
    held = resume.verified_indices
    assert {0, 1} <= held and 2 not in held  # later ones may have been verified meanwhile

    with in_process_server(reference, strategy=CountingServer()) as good:
        second = fetch_from_sources([good.endpoint], FINGERPRINT, dest, 0, FAST, resume=resume)
        plan_len = len(good.plans.plan_for(FAST.bucket_bytes, device_for(torch.device("cpu"))).buckets)
    assert second.ok, second.failures
    assert 0 < second.resumed_bytes < second.bytes
    assert sorted(good.strategy.sent) == sorted(set(range(plan_len)) - held)  # nothing verified resent
    for name, t in reference.items():
        assert torch.equal(dest[name], t), name


def test_a_source_skipping_a_bucket_we_never_verified_is_refused():
    resume = ResumeState()
    resume.bucket_bytes = 1 << 20
    resume.record(0, "aa")
    ack = protocol.Ack("0" * 32, 4000, 1 << 20, "blake3-keyed", ("aa", "bb"), "cc", skip=frozenset({0, 1}))
    with pytest.raises(SourceFailure, match="skips bucket 1"):
        resume.accept(ack)
    assert resume.offer() is None  # after a lie, nothing is trusted: start over


def test_a_checksum_that_changed_since_verification_is_refused():
    resume = ResumeState()
    resume.bucket_bytes = 1 << 20
    resume.record(0, "aa")
    ack = protocol.Ack("0" * 32, 4000, 1 << 20, "blake3-keyed", ("a0",), "cc", skip=frozenset({0}))
    with pytest.raises(SourceFailure):
        resume.accept(ack)


def test_another_bucket_size_starts_over():
    resume = ResumeState()
    resume.bucket_bytes = 1 << 20
    resume.record(0, "aa")
    ack = protocol.Ack("0" * 32, 4000, 2 << 20, "blake3-keyed", ("aa",), "cc")
    assert resume.accept(ack) == frozenset() and resume.offer() is None
