"""Resharding over the real server and client (in one process, Gloo between threads):
a rank of one shape fills its shard from source ranks of another."""

from __future__ import annotations

import contextlib

import pytest
import torch

from loader.transfer.bucket_sender import BucketSender
from loader.transfer.layout import ShardLayout
from loader.transfer.reshard_client import _ReshardAttempt, fetch_resharded
from loader.transfer.reshard_plan import SliceRequest
from loader.transfer.server import WeightServer
from tests.transfer.helpers import FAST
from tests.transfer.sharded_model import ModelSpec, full_weights, shard

pytestmark = pytest.mark.timeout(180)

SPEC = ModelSpec(layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=96, vocab=200, pad=64)


class CountingSender(BucketSender):
    """The real sender, counting what it sends (shared across the servers of a test)."""

    sent: list[int] = []

    def send(self, pg, buckets, device, before_bucket, item_messages=False):
        super().send(pg, buckets, device, before_bucket, item_messages)
        CountingSender.sent.append(sum(b.nbytes for b in buckets))


class CorruptSender(BucketSender):
    """A source that sends wrong bytes in every bucket (checksums stay the true ones)."""

    class _Flipping:
        def __init__(self, pg) -> None:
            self.pg = pg

        def send(self, tensors, dst, tag):
            bad = tensors[0].clone()
            bad[0] ^= 0xFF
            return self.pg.send([bad], dst, tag)

    def send(self, pg, buckets, device, before_bucket, item_messages=False):
        super().send(self._Flipping(pg), buckets, device, before_bucket, item_messages)


@contextlib.contextmanager
def sources(tp: int, pp: int = 1, sender_cls=BucketSender, full=None):
    """One started server per rank of a (tp, pp) instance: [(endpoint, layout)]."""
    full = full if full is not None else full_weights(SPEC)
    servers = []
    try:
        for rank in range(tp * pp):
            tensors, layout = shard(SPEC, full, tp, pp, rank)
            server = WeightServer(
                tensors, f"{tp:02x}{rank:02x}" * 16, rank, FAST, host="127.0.0.1",
                layout=layout, sender_cls=sender_cls,
            )
            server.start()
            servers.append(server)
        yield [(s.endpoint, s.reshard.layout) for s in servers]
    finally:
        for s in servers:
            s.stop()


def client_shard(tp: int, rank: int, pp: int = 1):
    expected, layout = shard(SPEC, full_weights(SPEC), tp, pp, rank)
    return expected, layout, {n: torch.zeros_like(t) for n, t in expected.items()}


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def assert_filled(dest, expected):
    for name, t in expected.items():
        assert torch.equal(dest[name], t), name


@pytest.mark.parametrize(("source_tp", "client_tp", "client_rank"), [(2, 1, 0), (1, 2, 1), (4, 2, 0)])
def test_a_rank_fills_its_shard_from_another_tp(source_tp, client_tp, client_rank):
    CountingSender.sent = []
    expected, layout, dest = client_shard(client_tp, client_rank)
    with sources(source_tp, sender_cls=CountingSender) as served:
        outcome = fetch_resharded([e for e, _ in served], layout, dest, client_rank, FAST)
    assert outcome.ok, outcome.failures
    assert_filled(dest, expected)
    assert outcome.bytes == nbytes(expected) == sum(CountingSender.sent)  # nothing more moved
    assert outcome.peer == outcome.peers[0]


def test_pipeline_stages_each_send_the_layers_they_hold():
    expected, layout, dest = client_shard(1, 0)
    with sources(1, pp=2) as served:
        outcome = fetch_resharded([e for e, _ in served], layout, dest, 0, FAST)
    assert outcome.ok, outcome.failures
    assert_filled(dest, expected)
    assert sorted(outcome.peers) == sorted(e for e, _ in served)


def test_a_corrupt_source_is_dropped_and_its_part_fetched_from_another():
    expected, layout, dest = client_shard(1, 0)
    with sources(2, sender_cls=CorruptSender) as corrupt, sources(1) as good:
        order = [corrupt[0][0], good[0][0], corrupt[1][0]]
        outcome = fetch_resharded(order, layout, dest, 0, FAST)
    assert outcome.ok, outcome.failures
    assert_filled(dest, expected)
    assert outcome.peers == [good[0][0]]
    assert [why for src, why in outcome.failures if src == corrupt[0][0]][0].startswith("checksum mismatch")


def test_when_no_source_covers_the_shard_the_reason_names_the_parameter():
    expected, layout, dest = client_shard(1, 0)
    with sources(2) as served:
        outcome = fetch_resharded([served[0][0]], layout, dest, 0, FAST)  # rank 1 not offered
    assert not outcome.ok
    assert outcome.failures[-1][0] == "reshard"
    assert "no source holds all of model.embed_tokens.weight" in outcome.failures[-1][1]


def test_all_sources_corrupt_ends_in_failure_with_every_reason():
    _, layout, dest = client_shard(1, 0)
    with sources(2, sender_cls=CorruptSender) as served:
        outcome = fetch_resharded([e for e, _ in served], layout, dest, 0, FAST)
    assert not outcome.ok
    assert [src for src, _ in outcome.failures][:1] == [served[0][0]]
    assert outcome.failures[-1][0] == "reshard"
    assert all(not t.any() for t in dest.values())  # not one unverified byte reached them


def test_an_unsupported_parameter_is_named_before_any_transfer():
    _, layout, dest = client_shard(1, 0)
    layout = ShardLayout(layout.content, 1, 1, 0, layout.params, (("model.x.qweight", "quantized (GPTQ)"),))
    outcome = fetch_resharded(["127.0.0.1:9"], layout, dest, 0, FAST)
    assert not outcome.ok
    assert outcome.failures == [("reshard", "cannot reshard model.x.qweight: quantized (GPTQ)")]


def test_other_weights_are_refused_at_the_layout_query():
    _, layout, dest = client_shard(1, 0)
    other = ShardLayout("d0" * 32, 1, 1, 0, layout.params)
    with sources(2) as served:
        outcome = fetch_resharded([e for e, _ in served], other, dest, 0, FAST)
    assert not outcome.ok
    assert "refused: content mismatch" in outcome.failures[0][1]


def test_the_source_refuses_a_slice_outside_its_tensors():
    """A client (authenticated, but buggy or hostile) asks for rows the source does not
    have: refused with the reason, nothing sent."""
    import zmq

    _, layout, dest = client_shard(1, 0)
    name = "model.layers.0.mlp.down_proj.weight"
    request = SliceRequest(name, 1, 10_000, 0, 8)
    with sources(2) as served:
        from loader.transfer.pieces import piece_views

        views = piece_views(dest, [request], at_source=False)
        attempt = _ReshardAttempt(served[0][0], layout, [request], views, 0, FAST, None, zmq.Context())
        reason = attempt.failure()
    assert reason is not None and "outside the tensor's shape" in reason, reason
