"""Receiving buckets in place (fetch_from_sources(in_place=True), as the model loader
does): direct buckets, and packed ones sent as one message per item, land in their
tensors; a failed source can still never write into the tensors once its attempt ended,
and bytes that landed in place count only once verified.

The premise is the Gloo fence: abort() leaves a posted receive armed, the fence does not.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import torch

from loader.config import MAX_STREAMS, TransferSettings
from loader.transfer import process_group, receive_pipeline
from loader.transfer.buckets import plan_buckets
from loader.transfer.client import fetch_from_sources
from loader.transfer.manifest import build_manifest
from loader.transfer.process_group import (
    bind_store_socket,
    create_transfer_group,
    destroy_group,
    fence_gloo,
)
from loader.transfer.resume import ResumeState
from tests.transfer.helpers import FAST, FINGERPRINT, empty_like_all, in_process_server
from tests.transfer.test_late_writes import (
    LateCorruptSource,
    assert_equal,
    big_tensors,
    small_tensors,
    wait_finished,
)

pytestmark = pytest.mark.timeout(180)


def _group_pair(streams: int = 1) -> tuple[object, object]:
    """Both ranks of a gloo transfer group, in this process."""
    store = bind_store_socket("127.0.0.1")
    port = store.getsockname()[1]
    groups: dict[int, object] = {}

    def join(rank: int) -> None:
        groups[rank] = create_transfer_group(
            "cpu", "127.0.0.1", port, rank, "f" * 32, 10.0, 10.0,
            listen_socket=store if rank == 0 else None, streams=streams,
        )

    threads = [threading.Thread(target=join, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return groups[0], groups[1]


@pytest.mark.parametrize("streams", [1, 3])
def test_the_fence_knows_how_many_contexts_a_group_runs(streams):
    source, client = _group_pair(streams)
    try:
        assert process_group._context_count(client) == streams
        assert process_group._context_count(object()) == MAX_STREAMS  # unknown: every residue
    finally:
        destroy_group(source)
        destroy_group(client)


class _RecordingGroup:
    """Not a Gloo group: destroy_group aborts it; records where its last reference went."""

    def __init__(self, released: list, aborted: list) -> None:
        self.released, self.aborted = released, aborted

    def abort(self) -> None:
        self.aborted.append(threading.current_thread().name)

    def __del__(self) -> None:
        self.released.append(threading.current_thread().name)


def test_a_discarded_group_is_destroyed_at_once_and_dropped_in_another_thread():
    released, aborted = [], []
    owner = SimpleNamespace(pg=_RecordingGroup(released, aborted))
    process_group.discard_group(owner)
    assert owner.pg is None and aborted == [threading.current_thread().name]
    _wait_for(released)
    assert released == ["netloader-group-release"]
    process_group.discard_group(owner)  # nothing left: a no-op


def _wait_for(seen: list) -> None:
    deadline = time.monotonic() + 10
    while not seen and time.monotonic() < deadline:
        time.sleep(0.01)


def test_a_quiet_group_is_fenced_in_the_release_thread_too():
    """No receive is outstanding: the caller need not wait for the fence either."""
    released, aborted = [], []
    process_group.discard_group(SimpleNamespace(pg=_RecordingGroup(released, aborted)), quiet=True)
    _wait_for(released)
    assert aborted == released == ["netloader-group-release"]


def test_a_transfer_that_received_everything_leaves_its_group_quiet_and_one_that_failed_does_not(
    monkeypatch,
):
    calls = []
    real = receive_pipeline.discard_group
    monkeypatch.setattr(
        receive_pipeline, "discard_group", lambda owner, quiet=False: (calls.append(quiet), real(owner, quiet))
    )
    reference = big_tensors(16)
    with in_process_server(big_tensors(16)) as good:
        assert fetch_from_sources([good.endpoint], FINGERPRINT, empty_like_all(reference), 0, FAST).ok
    with in_process_server(big_tensors(16), sender_cls=LateCorruptSource) as bad:
        assert not fetch_from_sources([bad.endpoint], FINGERPRINT, empty_like_all(reference), 0, FAST).ok
        wait_finished(bad)
    assert calls == [True, False]  # the corrupt source's first bucket failed, the rest unreceived


def test_a_discarded_gloo_group_is_fenced_before_it_is_dropped():
    source, client = _group_pair(2)
    target = torch.zeros(1 << 20, dtype=torch.uint8)
    armed = client.recv([target], 0, 7)  # noqa: F841 - kept alive, as a posted receive would be
    process_group.discard_group(SimpleNamespace(pg=client))
    del client
    try:
        source.send([torch.full((1 << 20,), 0x5A, dtype=torch.uint8)], 1, 7).wait()
    except Exception:
        pass  # the fenced group's peer sees its connection closed
    destroy_group(source)
    assert not target.any()


@pytest.mark.parametrize("close", ["fence", "abort"])
@pytest.mark.parametrize("streams", [1, 2, 3])
def test_only_the_fence_disarms_a_posted_receive(close, streams):
    """On every connection of the group: a receive is armed on each of its contexts."""
    source, client = _group_pair(streams)
    targets = [torch.zeros(1 << 20, dtype=torch.uint8) for _ in range(streams)]
    tags = [7 + i for i in range(streams)]  # tag t runs on context t % streams
    armed = [client.recv([t], 0, tag) for t, tag in zip(targets, tags, strict=True)]  # kept alive
    if close == "fence":
        assert fence_gloo(client)
    else:
        client.abort()
    for tag, work in zip(tags, armed, strict=True):
        try:
            source.send([torch.full((1 << 20,), 0x5A, dtype=torch.uint8)], 1, tag).wait()
            if close == "abort":
                work.wait()
        except Exception:
            pass  # the fenced group's peer sees its connection closed
    landed = [bool(t.any()) for t in targets]
    destroy_group(source)
    destroy_group(client)
    assert landed == [close == "abort"] * streams


@pytest.fixture
def places(monkeypatch) -> list[int]:
    """Indices of the buckets received in place."""
    seen: list[int] = []
    real = receive_pipeline.Destination.places_of

    def spy(self, bucket):
        seen.append(bucket.index)
        return real(self, bucket)

    monkeypatch.setattr(receive_pipeline.Destination, "places_of", spy)
    return seen


def mixed_tensors(seed: int) -> dict[str, torch.Tensor]:
    """Direct and packed buckets, the packed items of odd byte sizes (2-byte dtype), so
    that 1 KiB checksum blocks straddle items at every alignment."""
    g = torch.Generator().manual_seed(seed)
    mixed = {f"h{i}": torch.randn(1000 + 37 * i, generator=g).to(torch.bfloat16) for i in range(40)}
    return {**mixed, **big_tensors(seed)}


KINDS = pytest.mark.parametrize(
    "make", [big_tensors, small_tensors, mixed_tensors], ids=["direct", "packed", "mixed"]
)


@KINDS
def test_in_place_a_failed_source_cannot_overwrite_what_the_next_source_delivered(places, make):
    reference = make(11)
    dest = empty_like_all(reference)
    with in_process_server(make(11), sender_cls=LateCorruptSource) as bad:
        with in_process_server(make(11)) as good:
            outcome = fetch_from_sources(
                [bad.endpoint, good.endpoint], FINGERPRINT, dest, 0, FAST, in_place=True
            )
            assert outcome.ok and outcome.peer == good.endpoint, outcome.failures
            assert "checksum mismatch" in outcome.failures[0][1]
        wait_finished(bad)
    assert places, "no bucket was received in place"
    assert_equal(dest, reference)


@KINDS
def test_in_place_a_failed_source_cannot_overwrite_the_disk_fallback(places, make):
    reference = make(12)
    dest = empty_like_all(reference)
    with in_process_server(make(12), sender_cls=LateCorruptSource) as bad:
        assert not fetch_from_sources([bad.endpoint], FINGERPRINT, dest, 0, FAST, in_place=True).ok
        for name, t in reference.items():  # what the disk fallback does
            dest[name].copy_(t)
        wait_finished(bad)
    assert places
    assert_equal(dest, reference)


class Heard:
    def __init__(self) -> None:
        self.verified: list[int] = []

    def transfer_started(self, source, ack, plan) -> None:
        pass

    def bucket_verified(self, source, index) -> None:
        self.verified.append(index)

    def attempt_failed(self, source, reason) -> None:
        pass


@KINDS
def test_bytes_received_in_place_count_only_once_verified(places, make):
    """A corrupt source's bytes land in place, but nobody is told of them and the
    resume state holds none of them."""
    observer, resume = Heard(), ResumeState()
    dest = empty_like_all(make(13))
    with in_process_server(make(13), sender_cls=LateCorruptSource) as bad:
        outcome = fetch_from_sources(
            [bad.endpoint], FINGERPRINT, dest, 0, FAST, observer=observer, resume=resume,
            in_place=True,
        )
        wait_finished(bad)
    assert not outcome.ok and "checksum mismatch" in outcome.failures[0][1]
    assert places
    assert observer.verified == [] and resume.verified_buckets == 0


def fetch_in_place(make, seed: int) -> list:
    """Fetch make(seed) in place from a good source; its bucket plan."""
    reference = make(seed)
    dest = empty_like_all(reference)
    with in_process_server(make(seed)) as good:
        outcome = fetch_from_sources([good.endpoint], FINGERPRINT, dest, 0, FAST, in_place=True)
    assert outcome.ok, outcome.failures
    assert_equal(dest, reference)
    return plan_buckets(build_manifest(reference).specs, FAST.bucket_bytes)


@KINDS
def test_in_place_transfer_delivers_every_byte(places, make):
    plan = fetch_in_place(make, 14)
    assert sorted(places) == [b.index for b in plan]  # every bucket, packed ones too


def test_a_source_that_sends_packed_buckets_whole_is_received_through_staging(places, monkeypatch):
    """What a source older than item messages sends: the ack has no `items`, so the
    client posts one receive per bucket and unpacks the packed ones once verified."""
    from loader.transfer import server as server_module

    monkeypatch.setattr(server_module, "item_messages", lambda device: False)
    plan = fetch_in_place(mixed_tensors, 15)
    assert sorted(places) == [b.index for b in plan if b.direct]  # packed ones were staged


def test_a_group_that_comes_up_after_its_attempt_was_abandoned_is_destroyed_at_once(monkeypatch):
    """The watchdog gives up on a group that takes too long to come up; when the backend
    finally returns it, nothing may keep it (or post a receive on it)."""
    released, aborted = [], []
    late = threading.Event()

    def slow_group(*args, **kwargs):
        late.wait(60)
        return _RecordingGroup(released, aborted)

    monkeypatch.setattr(receive_pipeline, "create_transfer_group", slow_group)
    settings = TransferSettings(**{**FAST.__dict__, "pg_setup_timeout_s": 1.0})
    reference = big_tensors(17)
    with in_process_server(big_tensors(17)) as good:
        outcome = fetch_from_sources([good.endpoint], FINGERPRINT, empty_like_all(reference), 0, settings)
    assert not outcome.ok and "process-group setup timed out" in outcome.failures[0][1], outcome.failures
    assert aborted == []
    late.set()  # the backend returns the group now
    _wait_for(aborted)
    assert aborted == ["netloader-transfer"]  # destroyed by the thread that got it, at once
