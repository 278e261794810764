"""Codec validation, hypothesis round-trips and a decoder fuzz (random + mutated messages)."""

import random

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.codec import (
    MAX_INCARNATION,
    MAX_MESSAGE_BYTES,
    MAX_META_BYTES,
    MAX_STATUS_BYTES,
    Decoder,
    Invalid,
    encode,
    validate_meta,
)
from mesh.core import MeshCore
from mesh.sim import Simulator

names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-._", min_size=1, max_size=20)
addrs = st.builds(lambda a, b, p: f"10.0.{a}.{b}:{p}", st.integers(0, 255), st.integers(0, 255),
                  st.integers(1, 65535))
incarnations = st.integers(0, MAX_INCARNATION)
meta_values = st.one_of(st.none(), st.booleans(), st.integers(-(2**53), 2**53),
                        st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
metas = st.dictionaries(st.text(min_size=1, max_size=10), meta_values, max_size=6)


@st.composite
def entries(draw):
    state = draw(st.integers(0, 3))
    wire = {"n": draw(names), "a": draw(addrs), "i": draw(incarnations), "s": state}
    if state == 0:
        wire["m"] = draw(metas)
    if state == 1 and draw(st.booleans()):
        wire["f"] = draw(names)
    return wire


@st.composite
def messages(draw):
    kind = draw(st.sampled_from(["ping", "ack", "preq", "nack", "gos", "syn", "dig", "dlt", "push", "qry"]))
    msg = {"v": 1, "t": kind}
    if kind != "qry":
        msg["f"] = draw(names)
        msg["fa"] = draw(addrs)
    if kind in ("ping", "ack", "gos"):
        msg["u"] = draw(st.lists(entries(), max_size=4))
    if kind in ("ping", "ack", "preq", "nack", "qry"):
        msg["q"] = draw(st.integers(0, 2**24))
    if kind in ("ping", "preq"):
        msg["tg"] = draw(names)
    if kind == "preq":
        msg["ta"] = draw(addrs)
    if kind in ("syn", "dig"):
        msg["h"] = draw(st.integers(0, 2**64 - 1))
    if kind == "dig":
        msg["d"] = draw(st.lists(st.tuples(names, incarnations, st.integers(0, 3)).map(list), max_size=5))
    if kind == "dlt":
        msg["u"] = draw(st.lists(entries(), max_size=4))
        msg["w"] = draw(st.lists(names, max_size=4))
    if kind == "push":
        msg["u"] = draw(st.lists(entries(), max_size=4))
        msg["r"] = draw(st.booleans())
    return msg


def _fits(msg):
    return all(len(orjson.dumps(e.get("m", {}))) <= MAX_META_BYTES for e in msg.get("u", []))


@settings(max_examples=300, deadline=None)
@given(messages())
def test_valid_messages_round_trip(msg):
    decoded = Decoder().decode(encode(msg))
    if _fits(msg):
        assert decoded == msg
    else:
        assert decoded is None


@settings(max_examples=200, deadline=None)
@given(messages(), st.sampled_from(["v", "t", "f", "fa", "q", "tg", "ta", "h", "d", "u", "w", "r"]),
       st.one_of(st.none(), st.integers(-5, 5), st.text(max_size=3), st.lists(st.integers(-(2**63), 2**63 - 1), max_size=2),
                 st.floats(allow_nan=True)))
def test_corrupted_field_is_rejected_not_raised(msg, key, value):
    if key not in msg:
        return
    bad = dict(msg)
    bad[key] = value
    decoder = Decoder()
    decoded = decoder.decode(encode(bad) if not isinstance(value, float) or value == value else b"{")
    # a replacement that happens to be valid for the field is fine; otherwise it is counted
    assert decoded is None or decoded["t"] == msg["t"] or key == "t"
    assert decoder.accepted + decoder.rejected_total == 1


def test_specific_rejections_are_counted_by_reason():
    decoder = Decoder()
    cases = [
        b"", b"[]", b"not json", b'{"v":2,"t":"ping"}', b'{"v":1,"t":"bogus"}',
        b'{"v":1,"t":"ping","f":"a","fa":"1.2.3.4:5","q":-1,"tg":"b"}',
        b'{"v":1,"t":"ping","f":"a b","fa":"1.2.3.4:5","q":1,"tg":"b"}',
        b'{"v":1,"t":"ping","f":"a","fa":"1.2.3.4:70000","q":1,"tg":"b"}',
        b'{"v":1,"t":"syn","f":"a","fa":"1.2.3.4:5","h":true}',
        b'{"v":1,"t":"gos","f":"a","u":[{"n":"x","a":"1.2.3.4:5","i":1,"s":2,"m":{}}]}',
        b'{"v":1,"t":"gos","f":"a","u":[{"n":"x","a":"1.2.3.4:5","i":1,"s":0,"m":{"k":[1]}}]}',
        orjson.dumps({"v": 1, "t": "gos", "f": "a", "u": [
            {"n": "x", "a": "1.2.3.4:5", "i": 1, "s": 0, "m": {"k": "x" * 600}}]}),
        b"[" * 100000,
        b"{}" * 10,
    ]
    for case in cases:
        assert decoder.decode(case) is None, case
    assert decoder.rejected_total == len(cases)
    assert decoder.decode("a string") is None


def test_meta_limits():
    assert validate_meta({"fingerprint": "ab" * 32, "tp": 2, "ready": True, "load": 0.5}) is not None
    for bad in ({"k": {"nested": 1}}, {"": 1}, {"k": float("inf")}, {f"k{i}": i for i in range(40)}):
        try:
            validate_meta(bad)
        except Invalid:
            continue
        raise AssertionError(f"accepted {bad}")


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
    original = sim._dispatch

    def capture(node, out):
        corpus.extend(encode(msg) for _, msg in out)
        original(node, out)

    sim._dispatch = capture
    sim.run_for(5.0)
    sim.advertise("n2", {"fingerprint": "f", "tp": 1})
    sim.run_for(2.0)
    sim._dispatch = original
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


def _push_of_size(total_bytes):
    entry = {"n": "m", "a": "10.0.0.1:1", "i": 1, "s": 0, "m": {"k": "x" * 200}}
    count = total_bytes // len(orjson.dumps(entry))
    return encode({"v": 1, "t": "push", "f": "a", "fa": "1.2.3.4:5", "r": False, "u": [entry] * count})


def test_member_messages_are_limited_to_one_mib():
    assert MAX_MESSAGE_BYTES == 1024 * 1024
    decoder = Decoder()
    small, big = _push_of_size(1000 * 1000), _push_of_size(1100 * 1000)
    assert len(small) <= MAX_MESSAGE_BYTES < len(big)
    assert decoder.decode(small) is not None
    assert decoder.decode(big) is None and decoder.rejected["too large"] == 1
    assert Decoder(max_bytes=MAX_STATUS_BYTES).decode(big) is not None  # `mesh status` replies


def test_incarnations_are_limited_so_a_refutation_is_always_valid():
    entry = {"n": "m", "a": "10.0.0.1:1", "s": 1}
    for i, ok in ((MAX_INCARNATION, True), (MAX_INCARNATION + 1, False), (2**53, False)):
        gos = {"v": 1, "t": "gos", "f": "a", "u": [{**entry, "i": i}]}
        dig = {"v": 1, "t": "dig", "f": "a", "fa": "1.2.3.4:5", "h": 1, "d": [["m", i, 1]]}
        assert (Decoder().decode(encode(gos)) is not None) is ok
        assert (Decoder().decode(encode(dig)) is not None) is ok
