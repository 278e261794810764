"""Codec: the exact wire form of every message, exact decoding of valid messages and the
exact rejection (by reason) of invalid ones, hypothesis round-trips and a decoder fuzz."""

import dataclasses
import math
import random

import orjson
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mesh.codec import (
    MAX_INCARNATION,
    MAX_MESSAGE_BYTES,
    MAX_META_BYTES,
    MAX_STATUS_BYTES,
    Decoder,
    Invalid,
    encode,
    to_wire,
    valid_addr,
    valid_name,
    validate_meta,
)
from mesh.core import MeshCore
from mesh.entries import ALIVE, DEAD, SUSPECT, Entry
from mesh.messages import (
    Ack,
    Delta,
    Digest,
    Gossip,
    Nack,
    Ping,
    PingReq,
    PushState,
    StatusQuery,
    StatusReply,
    Sync,
)
from mesh.sim import Simulator

names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-._", min_size=1, max_size=20)
addrs = st.builds(lambda a, b, p: f"10.0.{a}.{b}:{p}", st.integers(0, 255), st.integers(0, 255),
                  st.integers(1, 65535))
incarnations = st.integers(0, MAX_INCARNATION)
meta_values = st.one_of(st.none(), st.booleans(), st.integers(-(2**53), 2**53),
                        st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
metas = st.dictionaries(st.text(min_size=1, max_size=10), meta_values, max_size=6)
KINDS = ["ping", "ack", "preq", "nack", "gos", "syn", "dig", "dlt", "push", "qry", "qres"]


@st.composite
def entries(draw):
    """(wire entry, the Entry it decodes to)."""
    state = draw(st.integers(0, 3))
    wire = {"n": draw(names), "a": draw(addrs), "i": draw(incarnations), "s": state}
    if state == ALIVE:
        wire["m"] = draw(metas)
    if state == SUSPECT and draw(st.booleans()):
        wire["f"] = draw(names)
    return wire, Entry(wire["n"], wire["a"], wire["i"], state, wire.get("m", {}), wire.get("f"))


@st.composite
def member_rows(draw):
    row = {"name": draw(names), "addr": draw(addrs),
           "state": draw(st.sampled_from(["alive", "suspect", "dead", "left"])),
           "incarnation": draw(incarnations), "meta": draw(metas),
           "rtt": draw(st.one_of(st.none(), st.floats(0, 10))),
           "last_heard": draw(st.one_of(st.none(), st.floats(0, 1000)))}
    return row


@st.composite
def messages(draw):
    """(wire dict, the typed message it decodes to), of every type."""
    kind = draw(st.sampled_from(KINDS))
    wire = {"v": 1, "t": kind}
    if kind not in ("qry", "qres"):
        wire["f"], wire["fa"] = draw(names), draw(addrs)
    if kind in ("ping", "ack", "preq", "nack", "qry", "qres"):
        wire["q"] = draw(st.integers(0, 2**53))
    if kind in ("ping", "preq"):
        wire["tg"] = draw(names)
    if kind == "preq":
        wire["ta"] = draw(addrs)
    if kind in ("syn", "dig"):
        wire["h"] = draw(st.integers(0, 2**64 - 1))
    updates = draw(st.lists(entries(), max_size=4))
    if kind in ("ping", "ack", "gos", "dlt", "push"):
        wire["u"] = [w for w, _ in updates]
    updates = tuple(e for _, e in updates)
    rows = draw(st.lists(st.tuples(names, incarnations, st.integers(0, 3)), max_size=5))
    wanted = draw(st.lists(names, max_size=4))
    f, fa = wire.get("f"), wire.get("fa")
    match kind:
        case "ping":
            typed = Ping(f, fa, wire["q"], wire["tg"], updates)
        case "ack":
            typed = Ack(f, wire["q"], updates, fa)
        case "preq":
            typed = PingReq(f, fa, wire["q"], wire["tg"], wire["ta"])
        case "nack":
            typed = Nack(f, wire["q"], fa)
        case "gos":
            typed = Gossip(f, updates, fa)
        case "syn":
            typed = Sync(f, fa, wire["h"])
        case "dig":
            wire["d"] = [list(r) for r in rows]
            typed = Digest(f, fa, wire["h"], tuple(rows))
        case "dlt":
            wire["w"] = wanted
            typed = Delta(f, fa, updates, tuple(wanted))
        case "push":
            wire["r"] = draw(st.booleans())
            typed = PushState(f, fa, updates, wire["r"])
        case "qry":
            typed = StatusQuery(wire["q"])
        case _:
            wire["self"] = draw(names)
            wire["ms"] = draw(st.lists(member_rows(), max_size=3))
            typed = StatusReply(wire["q"], wire["self"], tuple(wire["ms"]))
    return wire, typed


def _metas_fit(wire):
    metas_ = [e.get("m", {}) for e in wire.get("u", [])] + [r["meta"] for r in wire.get("ms", [])]
    return all(len(orjson.dumps(m)) <= MAX_META_BYTES for m in metas_)


def _decode_one(data):
    """(decoded message or None, {reason: 1} for a rejection)."""
    decoder = Decoder()
    decoded = decoder.decode(data)
    assert decoder.accepted + decoder.rejected_total == 1
    return decoded, dict(decoder.rejected)


@settings(max_examples=400, deadline=None)
@given(messages())
def test_valid_messages_decode_to_the_exact_typed_message_and_back(pair):
    wire, typed = pair
    decoded, rejected = _decode_one(orjson.dumps(wire))
    if _metas_fit(wire):
        assert decoded == typed and rejected == {}
        assert _decode_one(encode(typed)) == (typed, {})
    else:
        assert decoded is None and rejected == {"meta size": 1}


# the typed field each wire key decodes into
FIELDS = {"f": "sender", "fa": "sender_addr", "tg": "target", "ta": "target_addr", "h": "view_hash",
          "d": "rows", "u": "updates", "w": "wanted", "r": "reply", "self": "responder", "ms": "members"}


def _expected(typed, kind, key, value):
    """What decoding yields once `key` holds `value` (as JSON reads it back): the typed
    message with that field replaced, or the name of the rejection."""
    if key == "v":
        return typed if value == 1 else "version"
    if key == "t":
        return "malformed" if isinstance(value, list) else "type"  # unhashable, or not a type
    if key in ("f", "tg", "self"):
        ok, reason = valid_name(value), "name"
    elif key in ("fa", "ta"):
        ok, reason = valid_addr(value), "addr"
    elif key in ("q", "h"):
        ok, reason = type(value) is int and 0 <= value <= (2**53 if key == "q" else 2**64 - 1), "int"
    elif key == "r":
        ok, reason = isinstance(value, bool), "reply flag"
    else:  # "d", "u", "w", "ms": lists, whose items here (ints) are never valid
        ok = value == []
        reason = {"d": "digest row", "u": "entry", "w": "name", "ms": "member row"}[key]
        reason = reason if isinstance(value, list) else "list"
        value = ()
    if not ok:
        return reason
    field = FIELDS.get(key) or ("query_id" if kind in ("qry", "qres") else "seq")
    return dataclasses.replace(typed, **{field: value})


corruptions = st.one_of(st.none(), st.integers(-5, 5), st.text(max_size=3), st.sampled_from(["a:1", "", "a b"]),
                        st.lists(st.integers(-(2**63), 2**63 - 1), max_size=2), st.floats(allow_nan=True))


@settings(max_examples=400, deadline=None)
@given(messages(), st.data())
def test_a_corrupted_field_gives_the_exact_message_or_the_exact_rejection(pair, data):
    """Each field in turn holds a random value instead (the rest of the message is valid)."""
    wire, typed = pair
    assume(_metas_fit(wire))
    for key in sorted(wire):
        value = data.draw(corruptions, label=key)
        if key == "t" and value in KINDS:
            continue  # another valid type: a different message
        if isinstance(value, float) and math.isnan(value):
            assert _decode_one(orjson.dumps(wire).replace(b'"t"', b'"t":NaN,"x"')) == (None, {"json": 1})
            continue
        expected = _expected(typed, wire["t"], key, orjson.loads(orjson.dumps(value)))  # inf: null
        decoded, rejected = _decode_one(orjson.dumps({**wire, key: value}))
        if isinstance(expected, str):
            assert (decoded, rejected) == (None, {expected: 1}), (key, value)
        else:
            assert (decoded, rejected) == (expected, {}), (key, value)

E = Entry("x", "1.2.3.4:5", 1, ALIVE, {"k": 1})
S = Entry("y", "1.2.3.4:6", 2, SUSPECT, accuser="z")
WIRE_E = {"n": "x", "a": "1.2.3.4:5", "i": 1, "s": 0, "m": {"k": 1}}
WIRE_S = {"n": "y", "a": "1.2.3.4:6", "i": 2, "s": 1, "f": "z"}
ROW = {"name": "x", "addr": "1.2.3.4:5", "state": "alive", "incarnation": 1, "meta": {}, "rtt": None,
       "last_heard": 0.5}
WIRE_FORMS = [  # the protocol on the wire: changing any of these splits a mesh by version
    (Ping("a", "1.2.3.4:5", 7, "b"), {"v": 1, "t": "ping", "f": "a", "fa": "1.2.3.4:5", "q": 7, "tg": "b"}),
    (Ping("a", "1.2.3.4:5", 7, "b", (E,)),
     {"v": 1, "t": "ping", "f": "a", "fa": "1.2.3.4:5", "q": 7, "tg": "b", "u": [WIRE_E]}),
    (Ack("a", 7), {"v": 1, "t": "ack", "f": "a", "q": 7}),
    (Ack("a", 7, (S,), "1.2.3.4:5"), {"v": 1, "t": "ack", "f": "a", "fa": "1.2.3.4:5", "q": 7, "u": [WIRE_S]}),
    (PingReq("a", "1.2.3.4:5", 7, "b", "1.2.3.4:6"),
     {"v": 1, "t": "preq", "f": "a", "fa": "1.2.3.4:5", "q": 7, "tg": "b", "ta": "1.2.3.4:6"}),
    (Nack("a", 7), {"v": 1, "t": "nack", "f": "a", "q": 7}),
    (Gossip("a", (E, Entry("w", "1.2.3.4:7", 0, DEAD))),
     {"v": 1, "t": "gos", "f": "a", "u": [WIRE_E, {"n": "w", "a": "1.2.3.4:7", "i": 0, "s": 2}]}),
    (Gossip("a"), {"v": 1, "t": "gos", "f": "a"}),
    (Sync("a", "1.2.3.4:5", 2**64 - 1), {"v": 1, "t": "syn", "f": "a", "fa": "1.2.3.4:5", "h": 2**64 - 1}),
    (Digest("a", "1.2.3.4:5", 3, (("x", 1, 0), ("y", 2, 1))),
     {"v": 1, "t": "dig", "f": "a", "fa": "1.2.3.4:5", "h": 3, "d": [["x", 1, 0], ["y", 2, 1]]}),
    (Delta("a", "1.2.3.4:5", (E,), ("y",)),
     {"v": 1, "t": "dlt", "f": "a", "fa": "1.2.3.4:5", "u": [WIRE_E], "w": ["y"]}),
    (Delta("a", "1.2.3.4:5"), {"v": 1, "t": "dlt", "f": "a", "fa": "1.2.3.4:5", "u": [], "w": []}),
    (PushState("a", "1.2.3.4:5", (E,), True),
     {"v": 1, "t": "push", "f": "a", "fa": "1.2.3.4:5", "u": [WIRE_E], "r": True}),
    (StatusQuery(9), {"v": 1, "t": "qry", "q": 9}),
    (StatusReply(9, "a", (ROW,)), {"v": 1, "t": "qres", "q": 9, "self": "a", "ms": [ROW]}),
]


@pytest.mark.parametrize("typed, wire", WIRE_FORMS, ids=[type(t).__name__ for t, _ in WIRE_FORMS])
def test_wire_form_of_every_message(typed, wire):
    assert orjson.loads(orjson.dumps(to_wire(typed))) == wire
    assert orjson.loads(encode(typed)) == wire
    assert _decode_one(orjson.dumps(wire)) == (typed, {})


def test_optional_fields_default_when_absent_and_piggyback_on_preq_and_nack_is_ignored():
    base = {"v": 1, "f": "a", "fa": "1.2.3.4:5"}
    assert _decode_one(orjson.dumps({**base, "t": "dlt"})) == (Delta("a", "1.2.3.4:5"), {})
    assert _decode_one(orjson.dumps({**base, "t": "ping", "q": 1, "tg": "b", "u": []})) == (
        Ping("a", "1.2.3.4:5", 1, "b"), {})
    preq = {**base, "t": "preq", "q": 1, "tg": "b", "ta": "1.2.3.4:6"}
    assert _decode_one(orjson.dumps({**preq, "u": [WIRE_E]})) == (
        PingReq("a", "1.2.3.4:5", 1, "b", "1.2.3.4:6"), {})
    assert _decode_one(orjson.dumps({**preq, "u": [{**WIRE_E, "s": 2}]})) == (
        None, {"meta on non-alive entry": 1})  # validated all the same
    assert _decode_one(orjson.dumps({**base, "t": "nack", "q": 1, "u": [WIRE_S]})) == (
        Nack("a", 1, "1.2.3.4:5"), {})
    assert _decode_one(orjson.dumps({**base, "t": "nack", "q": 1, "u": 5})) == (None, {"list": 1})
    for kind in ("ping", "preq", "syn", "dig", "dlt", "push"):  # answered: the address is required
        assert _decode_one(orjson.dumps({"v": 1, "t": kind, "f": "a"})) == (None, {"addr": 1})
    assert _decode_one(orjson.dumps({"v": 1, "t": "push", "f": "a", "fa": "1.2.3.4:5", "r": True})) == (
        None, {"list": 1})


REJECTIONS = [
    (b"", "json"),
    (b"[]", "version"),
    (b"not json", "json"),
    (b'{"v":2,"t":"ping"}', "version"),
    (b'{"v":1,"t":"bogus"}', "type"),
    (b'{"v":1,"t":[1]}', "malformed"),
    (b'{"v":1,"t":"ping","f":"a","fa":"1.2.3.4:5","q":-1,"tg":"b"}', "int"),
    (b'{"v":1,"t":"ping","f":"a b","fa":"1.2.3.4:5","q":1,"tg":"b"}', "name"),
    (b'{"v":1,"t":"ping","f":"a","fa":"1.2.3.4:70000","q":1,"tg":"b"}', "addr"),
    (b'{"v":1,"t":"syn","f":"a","fa":"1.2.3.4:5","h":true}', "int"),
    (b'{"v":1,"t":"gos","f":"a","u":[{"n":"x","a":"1.2.3.4:5","i":1,"s":2,"m":{}}]}', "meta on non-alive entry"),
    (b'{"v":1,"t":"gos","f":"a","u":[{"n":"x","a":"1.2.3.4:5","i":1,"s":0,"m":{"k":[1]}}]}', "meta value type"),
    (b'{"v":1,"t":"gos","f":"a","u":[{"n":"x","a":"1.2.3.4:5","i":1,"s":2,"f":"y"}]}',
     "accuser on non-suspect entry"),
    (b'{"v":1,"t":"gos","f":"a","u":[7]}', "entry"),
    (orjson.dumps({"v": 1, "t": "gos", "f": "a", "u": [
        {"n": "x", "a": "1.2.3.4:5", "i": 1, "s": 0, "m": {"k": "x" * 600}}]}), "meta str"),
    (orjson.dumps({"v": 1, "t": "gos", "f": "a", "u": [WIRE_E] * 65}), "list"),  # > MAX_PIGGYBACK_ENTRIES
    (b'{"v":1,"t":"dig","f":"a","fa":"1.2.3.4:5","h":1,"d":[["x",1]]}', "digest row"),
    (b'{"v":1,"t":"push","f":"a","fa":"1.2.3.4:5","u":[],"r":1}', "reply flag"),
    (b'{"v":1,"t":"qres","q":1,"self":"a","ms":[{"state":"gone"}]}', "state"),
    (orjson.dumps({"v": 1, "t": "qres", "q": 1, "self": "a", "ms": [{**ROW, "rtt": -1}]}), "number"),
    (b"[" * 100000, "json"),
    (b"{}" * 10, "json"),
    ("a string", "not bytes"),
]


@pytest.mark.parametrize("data, reason", REJECTIONS)
def test_each_rejection_is_counted_under_its_reason(data, reason):
    assert _decode_one(data) == (None, {reason: 1})


def test_meta_limits():
    good = {"fingerprint": "ab" * 32, "tp": 2, "ready": True, "load": 0.5}
    assert validate_meta(good) == good
    for bad, reason in (({"k": {"nested": 1}}, "meta value type"), ({"": 1}, "meta key"),
                        ({"k": float("inf")}, "meta float"), ({f"k{i}": i for i in range(40)}, "meta"),
                        ({"k": 2**53 + 1}, "meta int"), ({f"k{i}": "x" * 200 for i in range(3)}, "meta size")):
        with pytest.raises(Invalid) as info:
            validate_meta(bad)
        assert str(info.value) == reason


def _mutate(data: bytes, rng: random.Random) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(4)
        pos = rng.randrange(len(data) + 1)
        if op == 0 and data:
            data[min(pos, len(data) - 1)] = rng.randrange(256)
        elif op == 1:
            data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 2 and data:
            del data[pos:pos + rng.randint(1, 8)]
        else:
            token = rng.choice([b'"s":7', b'"i":-1', b'"u":5', b'null', b'1e999', b'"m":[]', b'{}', b'"t":"dlt"'])
            data[pos:pos] = token
    return bytes(data)


def _state(core: MeshCore):
    return (core.view_hash, core.version, core.incarnation, dict(core.view), len(core.rumors))


def test_decoder_fuzz_never_raises_and_rejected_messages_change_nothing():
    rng = random.Random(1234)
    sim = Simulator(seed=7)
    sim.add_node("n0")
    for i in range(1, 6):
        sim.add_node(f"n{i}", seeds=["n0"])
    sim.run_for(5.0)
    # a corpus of real protocol traffic to mutate
    corpus = []
    sim.on_send = lambda sender, addr, data: corpus.append(data)
    sim.run_for(5.0)
    sim.advertise("n2", {"fingerprint": "f", "tp": 1})
    sim.run_for(2.0)
    sim.on_send = None
    assert len(corpus) > 100

    target = sim.nodes["n3"].core
    decoder = Decoder()
    attempts = accepted = 0
    for i in range(12000):
        if i % 3 == 0:
            data = bytes(rng.randrange(256) for _ in range(rng.randint(0, 200)))
        else:
            data = _mutate(rng.choice(corpus), rng)
        before = _state(target)
        msg = decoder.decode(data)
        attempts += 1
        if msg is None:
            assert _state(target) == before
            continue
        accepted += 1
        target.handle(sim.now, msg)  # valid-but-odd messages must not raise either
        target.tick(sim.now)
    assert attempts == 12000
    assert decoder.rejected_total + decoder.accepted == attempts
    assert decoder.rejected_total > 5000
    assert accepted == decoder.accepted


PUSHED = Entry("m", "10.0.0.1:1", 1, ALIVE, {"k": "x" * 200})


def _push_of_size(total_bytes):
    count = total_bytes // len(orjson.dumps(to_wire(Gossip("a", (PUSHED,)))["u"][0]))
    return PushState("a", "1.2.3.4:5", (PUSHED,) * count, False)


def test_member_messages_are_limited_to_one_mib():
    assert MAX_MESSAGE_BYTES == 1024 * 1024
    small, big = _push_of_size(1000 * 1000), _push_of_size(1100 * 1000)
    assert len(encode(small)) <= MAX_MESSAGE_BYTES < len(encode(big))
    assert _decode_one(encode(small)) == (small, {})
    assert _decode_one(encode(big)) == (None, {"too large": 1})
    assert Decoder(max_bytes=MAX_STATUS_BYTES).decode(encode(big)) == big  # `mesh status` replies


def test_incarnations_are_limited_so_a_refutation_is_always_valid():
    for i, ok in ((MAX_INCARNATION, True), (MAX_INCARNATION + 1, False), (2**53, False)):
        entry = Entry("m", "10.0.0.1:1", i, SUSPECT)
        gos, dig = Gossip("a", (entry,)), Digest("a", "1.2.3.4:5", 1, (("m", i, SUSPECT),))
        assert _decode_one(encode(gos)) == ((gos, {}) if ok else (None, {"int": 1}))
        assert _decode_one(encode(dig)) == ((dig, {}) if ok else (None, {"int": 1}))
