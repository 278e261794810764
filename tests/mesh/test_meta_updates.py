"""Metadata changes gossiped as MetaUpdates (the changed keys against the previous
incarnation): smaller than the entry, rebuilt exactly by members holding the base, asked
for whole by the others, never on pings and acks, and validated like any entry."""

import random

import orjson
import pytest

from mesh.codec import Decoder, encode, entry_size
from mesh.core import MeshCore
from mesh.entries import ALIVE, SUSPECT, Entry, MetaUpdate, meta_changes
from mesh.messages import Ack, Delta, Gossip, Ping
from tests.mesh.test_protocol_sim import cluster, run_until

RECORD = {
    "role": "vllm-worker", "model": "/models/Qwen2.5-72B-Instruct", "fingerprint": "ab" * 32,
    "tp": 8, "pp": 1, "rank": 3, "ready": True, "endpoint": "10.0.3.7:41003",
    "state": "complete", "load": 0, "progress": 1.0, "zone": "rack-3",
}


def core(name: str) -> MeshCore:
    return MeshCore(name, f"10.0.0.{len(name)}:7946", 0.0, random.Random(name), meta=RECORD)


def gossip_of(out, name: str) -> list:
    """The updates about `name` that `out` gossips."""
    return [u for _, msg in out if isinstance(msg, Gossip) for u in msg.updates if u.name == name]


def test_meta_changes_name_changed_added_and_removed_keys_and_refuse_a_new_none():
    assert meta_changes({"a": 1, "b": 2, "c": 3}, {"a": 1, "b": 5, "d": "x"}) == {"b": 5, "d": "x", "c": None}
    assert meta_changes({"a": 1}, {"a": 1.0}) == {"a": 1.0}  # 1 == 1.0, but not the same value
    assert meta_changes({"a": 1}, {"a": 1, "b": None}) is None  # would read as a removal


def test_an_advertised_change_travels_as_its_keys_and_is_rebuilt_exactly():
    author, reader = core("author"), core("reader")
    reader._apply(0.0, author.view["author"], gossip=True)
    author._apply(0.0, reader.view["reader"], gossip=True)
    out = author.advertise(1.0, {**{k: v for k, v in RECORD.items() if k != "zone"},
                                 "load": 1, "state": "receiving", "progress": 0.25})
    (update,) = gossip_of(out, "author")
    assert isinstance(update, MetaUpdate)
    assert update.changes == {"load": 1, "state": "receiving", "progress": 0.25, "zone": None}
    assert entry_size(update) * 3 < entry_size(author.view["author"])
    wire = Decoder().decode(encode(Gossip("author", (update,))))
    assert wire == Gossip("author", (update,))
    reader.handle(1.1, wire)
    assert reader.view["author"] == author.view["author"]  # meta, incarnation, address
    assert reader.rumors["author"].entry == update  # passed on in the same small form


def test_a_member_without_the_base_asks_the_sender_once_and_takes_the_whole_entry():
    author, relay, late = core("author"), core("relay"), core("late")
    for c in (relay, late):
        c._apply(0.0, author.view["author"], gossip=True)
        c._apply(0.0, relay.view["relay"], gossip=True)
    author.advertise(1.0, {**RECORD, "load": 1})
    first = author.rumors["author"].entry
    relay.handle(1.1, Gossip("author", (first,)))  # `late` misses this one
    author.advertise(2.0, {**RECORD, "load": 2})
    second = author.rumors["author"].entry
    relay.handle(2.1, Gossip("author", (second,)))
    assert relay.view["author"].meta["load"] == 2
    out = late.handle(2.2, Gossip("relay", (relay.rumors["author"].entry,)))
    assert out == [(relay.addr, Delta("late", late.addr, (), ("author",)))]
    assert late.view["author"].meta["load"] == 0  # nothing half-applied
    assert late.dropped["meta update without base"] == 1
    assert late.handle(2.3, Gossip("relay", (second,))) == []  # asked already
    (answer,) = relay.handle(2.4, out[0][1])
    late.handle(2.5, answer[1])
    assert late.view["author"] == author.view["author"]


def test_pings_and_acks_carry_no_meta_update_and_refuse_one_on_the_wire():
    author, reader = core("author"), core("reader")
    author._apply(0.0, reader.view["reader"], gossip=True)
    author.advertise(1.0, {**RECORD, "load": 1})
    assert isinstance(author.rumors["author"].entry, MetaUpdate)
    assert [u.name for u in author.rumors.take()] == ["reader"]  # the rest, but not the change
    update = author.rumors["author"].entry
    decoder = Decoder()
    for msg in (Ping("author", author.addr, 1, "reader", (update,)), Ack("author", 1, (update,))):
        assert decoder.decode(encode(msg)) is None
    assert decoder.rejected == {"addr": 2}  # read as an entry, which has an address


@pytest.mark.parametrize("change, reason", [
    ({"a": "10.0.0.1:1"}, "meta update"),  # an address never rides along
    ({"s": SUSPECT}, "meta update"),
    ({"m": {"x": 1}}, "meta update"),
    ({"mb": 7}, "int"),  # the base must be older than the incarnation
    ({"i": 0, "mb": 0}, "int"),
    ({"md": {"x": [1]}}, "meta value type"),
    ({"md": {"x": "y" * 600}}, "meta str"),
    ({"md": "load=1"}, "meta"),
])
def test_malformed_meta_updates_are_rejected_and_counted(change, reason):
    entry = {"n": "author", "i": 7, "s": ALIVE, "mb": 6, "md": {"load": 1}, **change}
    decoder = Decoder()
    assert decoder.decode(orjson.dumps({"v": 1, "t": "gos", "f": "author", "u": [entry]})) is None
    assert decoder.rejected[reason] == 1


def test_a_change_that_would_overflow_the_meta_limit_is_dropped():
    author, reader = core("author"), core("reader")
    reader._apply(0.0, author.view["author"], gossip=True)
    big = MetaUpdate("author", 1, 0, {f"k{i}": "v" * 40 for i in range(8)})
    reader.handle(1.0, Gossip("author", (big,)))
    assert reader.view["author"].meta == RECORD
    assert reader.dropped["meta update too large"] == 1


def test_a_refutation_is_an_empty_change_rebuilt_by_those_who_took_the_suspicion():
    author, reader, stranger = core("author"), core("reader"), core("stranger")
    reader._apply(0.0, author.view["author"], gossip=True)
    suspicion = Entry("author", author.addr, 0, SUSPECT, accuser="reader")
    reader._apply(1.0, suspicion, gossip=True)
    assert reader.view["author"].meta == {}  # a suspect entry carries no metadata
    author._apply(1.1, suspicion, gossip=True)
    refutation = author.rumors["author"].entry
    assert refutation == MetaUpdate("author", 1, 0, {})
    reader.handle(1.2, Gossip("author", (refutation,)))
    assert reader.view["author"] == author.view["author"]  # alive, incarnation 1, its metadata
    # a member that knew the author only as suspect (never alive at 0) has no base: it asks
    stranger._apply(0.0, Entry("author", author.addr, 0, ALIVE, {"old": 1}), gossip=True)
    stranger._apply(0.5, Entry("author", author.addr, 1, SUSPECT, accuser="x"), gossip=True)
    assert not stranger._apply(2.0, MetaUpdate("author", 2, 1, {}), gossip=True)


def test_every_view_ends_with_every_member_s_own_metadata_under_churn_and_loss():
    sim = cluster(30, loss=0.05)
    rng = random.Random(3)
    for step in range(40):
        name = f"n{rng.randrange(30)}"
        sim.advertise(name, {"load": rng.randrange(3), "progress": step / 40, "zone": "z"})
        sim.run_for(0.3)

    def everyone_agrees():
        own = {n.name: n.core.view[n.name] for n in sim.up_nodes()}  # (refutations bump them)
        return all(n.core.view.get(m) == e for n in sim.up_nodes() for m, e in own.items())

    assert run_until(sim, everyone_agrees, 30.0) is not None


def test_members_waiting_on_a_change_are_told_at_once_even_right_after_another_push():
    from mesh.core import NOTIFY_LIMIT

    author = core("author")
    others = [core(f"m{i:02d}") for i in range(NOTIFY_LIMIT + 4)]
    for c in others:
        author._apply(0.0, c.view[c.name], gossip=True)
    author._apply(0.0, Entry("gone", "10.0.9.9:7946", 3, "dead"), gossip=True)
    author.advertise(1.0, {**RECORD, "load": 1})  # the interval's push is used up
    quiet = author.advertise(1.01, {**RECORD, "load": 2})
    assert quiet == []  # without `notify`: spread at the next gossip tick
    waiting = ["m01", "m02", "nobody", "gone", "author", "m01"]
    out = author.advertise(1.02, {**RECORD, "load": 0, "state": "receiving"}, notify=waiting)
    told = {addr for addr, msg in out if isinstance(msg, Gossip) and gossip_of([(addr, msg)], "author")}
    assert told == {author.view["m01"].addr, author.view["m02"].addr}  # alive ones, once each
    crowd = author.advertise(1.03, {**RECORD, "load": 1}, notify=[c.name for c in others])
    assert len(crowd) == NOTIFY_LIMIT  # a bounded burst, whatever the caller names
    # the change is still a rumor for everyone else (later ticks carry it on)
    assert author.rumors["author"].entry.incarnation == author.view["author"].incarnation
