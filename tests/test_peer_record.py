"""The peer record: the wire keys a rank gossips, and reading them back from untrusted meta."""

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from loader.distribution.peer_record import PeerRecord, TransferState

RECEIVING = PeerRecord(
    fingerprint="f" * 64, tp=2, pp=1, rank=1, ready=False, role="vllm-worker", model="m",
    vllm="0.32.0", zone="z1", endpoint="10.0.0.1:5000", state=TransferState.RECEIVING,
    progress=0.3, load=1, capacity=2, upstream="10.0.0.2:5000", retained_bytes=0,
)


def test_wire_keys_are_the_gossiped_ones():
    assert RECEIVING.to_meta() == {
        "fingerprint": "f" * 64, "tp": 2, "pp": 1, "rank": 1, "ready": False,
        "role": "vllm-worker", "model": "m", "vllm": "0.32.0", "zone": "z1",
        "endpoint": "10.0.0.1:5000", "state": "receiving", "progress": 0.3, "load": 1,
        "capacity": 2, "upstream": "10.0.0.2:5000", "retained_bytes": 0,
    }


def test_unset_fields_are_not_gossiped():
    meta = PeerRecord(fingerprint="", tp=1, pp=1, rank=0).to_meta()
    assert meta == {"fingerprint": "", "tp": 1, "pp": 1, "rank": 0, "ready": False}


def test_round_trip():
    assert PeerRecord.from_meta(RECEIVING.to_meta()) == RECEIVING


def test_hand_written_counts_are_read():
    record = PeerRecord.from_meta({"fingerprint": "a", "tp": "2", "pp": "1", "rank": "0"})
    assert (record.tp, record.pp, record.rank, record.ready, record.state) == (2, 1, 0, False, None)


def test_malformed_meta_has_no_record():
    good = RECEIVING.to_meta()
    for key, bad in [("fingerprint", None), ("tp", 0), ("rank", True), ("rank", -1),
                     ("ready", "yes"), ("state", "done"), ("state", ["receiving"]),
                     ("progress", 1.5), ("progress", math.nan), ("progress", True),
                     ("load", "many"), ("load", -1), ("capacity", 2.5), ("endpoint", 5),
                     ("upstream", {"a": 1}), ("retained_bytes", "lots")]:
        assert PeerRecord.from_meta({**good, key: bad}) is None, (key, bad)
    assert PeerRecord.from_meta({}) is None  # a member that is no peer


values = st.one_of(st.none(), st.booleans(), st.integers(-3, 1 << 40), st.floats(allow_nan=True),
                   st.text(max_size=8), st.lists(st.integers(), max_size=2),
                   st.dictionaries(st.text(max_size=2), st.integers(), max_size=2))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(RECEIVING.to_meta()) + ["host", "other"]), values))
def test_never_raises_and_what_it_reads_round_trips(meta):
    record = PeerRecord.from_meta(meta)
    if record is not None:
        assert PeerRecord.from_meta(record.to_meta()) == record


def test_records_are_remembered_by_value_and_type():
    """1 and True are equal and hash alike, but only one is a rank: whichever is read first,
    the other is judged on its own."""
    good = RECEIVING.to_meta()
    for first, second in [(1, True), (True, 1)]:
        records = [PeerRecord.from_meta({**good, "rank": v}) for v in (first, second)]
        assert [r is not None for r in records] == [type(first) is int, type(second) is int]
    assert PeerRecord.from_meta({**good, "load": [1]}) is None  # unhashable: malformed
    assert PeerRecord.from_meta(dict(good)) is PeerRecord.from_meta(dict(good))
