"""Resharding's peer choice and its place in a rank's load: who qualifies from the mesh
(same content id, another shape, complete), the order (the one ranking rule), SOURCE
entries after them, and the messages that carry layouts and slices (untrusted input)."""

from types import MappingProxyType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loader.config import parse_extra_config
from loader.distribution.peer_record import PeerRecord, RankIdentity
from loader.distribution.ranking import rank_upstreams, reshard_table, upstream_table
from loader.distribution.sources import plan_sources
from loader.integration.reshard_stage import reshard_after
from loader.transfer import protocol
from loader.transfer.client import FetchOutcome, FetchRequest
from loader.transfer.layout import ShardLayout
from loader.transfer.manifest import build_manifest
from loader.transfer.reshard_plan import SliceRequest
from loader.transfer.reshard_protocol import (
    layout_query_message,
    layout_reply_message,
    parse_layout_query,
    parse_layout_reply,
)
from mesh.member import Member
from tests.transfer.helpers import FAST
from tests.transfer.sharded_model import ModelSpec, full_weights, shard

CONTENT = "c0" * 32
IDENTITY = RankIdentity(rank=0, tp=1, pp=1, device="cpu", fingerprint="fp-tp1", content=CONTENT)


def member(name, rtt=None, is_self=False, **meta):
    base = {"fingerprint": "fp-tp2", "tp": 2, "pp": 1, "rank": 0, "ready": True,
            "state": "complete", "endpoint": f"{name}:1", "content": CONTENT}
    base.update(meta)
    return Member(name, f"10.0.0.{len(name)}:1", "alive", 0, MappingProxyType(base), rtt, None, is_self)


def test_the_mesh_offers_complete_members_of_other_shapes_with_the_content_id():
    members = [
        member("me", is_self=True, tp=1, fingerprint="fp-tp1"),
        member("a0", rtt=0.004), member("a1", rank=1, rtt=0.0002),
        member("other", content="d1" * 32),
        member("receiving", state="receiving", ready=False),
        member("same-shape", tp=1, fingerprint="fp-tp1"),  # the same-shape stage's, not ours
        member("old", content=None),  # a peer that gossips no content id
    ]
    table = reshard_table(members, IDENTITY)
    assert sorted(u.name for u in table) == ["a0", "a1"]
    assert rank_upstreams(table) == ["a1:1", "a0:1"]  # nearest first, as any upstream
    assert [u.name for u in upstream_table(members, IDENTITY)] == ["same-shape"]


def test_content_is_gossiped_and_read_back():
    record = PeerRecord(fingerprint="f", tp=2, pp=1, rank=1, content=CONTENT)
    assert record.to_meta()["content"] == CONTENT
    assert PeerRecord.from_meta(record.to_meta()) == record
    assert PeerRecord.from_meta({**record.to_meta(), "content": 7}) is None


class _Presence:
    def candidates(self):
        from loader.distribution.discovery import Candidates

        return Candidates([], "no ready peer with this model among 2 alive members")

    def reshard_candidates(self):
        return ["a1:1", "a0:1"]


def test_resharding_sources_are_the_mesh_ones_then_source_entries():
    config = parse_extra_config({"SOURCE": [{"device_id": 0, "sources": ["s:1", "a0:1"]}]})
    plan = plan_sources(IDENTITY, config, _Presence())
    assert plan.static == ["s:1", "a0:1"]
    assert plan.reshard == ["a1:1", "a0:1", "s:1"]
    no_content = RankIdentity(0, 1, 1, "cpu", "fp-tp1")
    assert plan_sources(no_content, config, _Presence()).reshard == []


def test_the_reshard_stage_skips_sources_that_failed_other_than_by_refusing_our_shape(monkeypatch):
    import loader.integration.reshard_stage as stage

    asked = []

    def fake_fetch(sources, layout, tensors, rank, settings, keys):
        asked.extend(sources)
        return FetchOutcome(True, sources[0], 8, 0.1, [], peers=list(sources))

    monkeypatch.setattr(stage, "fetch_resharded", fake_fetch)
    same_shape = FetchOutcome(False, None, 0, 1.0, [
        ("s:1", "refused: rank mismatch: source serves rank 0, client is rank 1"),
        ("dead:1", "connection refused"),
    ])
    request = FetchRequest("fp", {}, 1, FAST)
    layout = ShardLayout(CONTENT, 2, 1, 1, ())
    outcome = reshard_after(same_shape, ["s:1", "dead:1", "m:1"], layout, {}, request)
    assert asked == ["s:1", "m:1"]
    assert outcome.ok and outcome.failures == same_shape.failures  # the reasons stay for the line


def test_a_reshard_hello_round_trips_and_must_name_one_slice_per_piece():
    spec = ModelSpec(layers=1)
    tensors, _ = shard(spec, full_weights(spec), 1, 1, 0)
    name = "model.layers.0.mlp.down_proj.weight"
    requests = [SliceRequest(name, 1, 0, 0, 8)]
    manifest = build_manifest({requests[0].piece_name: tensors[name][:, :8]})
    msg = protocol.hello_message(CONTENT, 0, manifest, "gloo", 1 << 20, reshard=requests)
    hello = protocol.parse_hello(protocol.decode(protocol.encode(msg), 1 << 20))
    assert hello.reshard == tuple(requests)
    for bad in ([], [requests[0].to_wire()] * 2, [[name, 1, 0]], [[name, 1, 0, 0]], "all"):
        with pytest.raises(protocol.ProtocolError):
            protocol.parse_hello({**msg, "reshard": bad})


def test_layout_messages_round_trip():
    spec = ModelSpec(layers=1)
    _, layout = shard(spec, full_weights(spec), 2, 1, 1)
    assert parse_layout_query(layout_query_message(CONTENT)) == CONTENT
    wire = protocol.decode(protocol.encode(layout_reply_message(layout)), 1 << 20)
    assert parse_layout_reply(wire) == layout
    assert parse_layout_reply({"type": "nack", "reason": "no"}).reason == "no"
    for bad in ({"type": "layout", "v": 2, "content": "Z"}, {"type": "layout", "v": 1, "content": "ab"},
                {"type": "layout", "v": 2}):
        with pytest.raises(protocol.ProtocolError):
            parse_layout_query(bad)


_value = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 1 << 50) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(params=_value, tp=_value, content=_value)
def test_an_untrusted_layout_is_parsed_or_refused_never_crashes(params, tp, content):
    obj = {"type": "layout", "layout": {"content": content, "tp": tp, "pp": 1, "rank": 0,
                                        "params": params, "unsupported": []}}
    try:
        layout = parse_layout_reply(obj)
    except protocol.ProtocolError:
        return
    for p in layout.params:
        p.validate()  # whatever was accepted is a consistent description
        assert all(s.stop <= p.logical_shape[p.dim] for s in p.segments)
