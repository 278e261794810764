import pytest
import torch

from loader.transfer import protocol
from loader.transfer.manifest import build_manifest

SESSION = "0123456789abcdef" * 2


def plan_length(n):
    """Each test ack's plan: as many buckets as checksums it carries."""
    return lambda bucket_bytes: n


def parse_ack(msg):
    return protocol.parse_reply(msg, plan_length(len(msg.get("checksums", []))))


MANIFEST = build_manifest({"a": torch.zeros(3), "b": torch.zeros(2, dtype=torch.int8)})


def hello(**changes):
    msg = protocol.hello_message("ab" * 32, 0, MANIFEST, "gloo", 1 << 20)
    msg.update(changes)
    return msg


def ack(**changes):
    msg = protocol.ack_message(
        protocol.Ack(SESSION, 4000, 1 << 20, "blake3-keyed", ("ff" * 32,), "aa" * 32)
    )
    msg.update(changes)
    return msg


def test_round_trip():
    parsed = protocol.parse_hello(protocol.decode(protocol.encode(hello()), 1 << 20))
    assert parsed.manifest == MANIFEST and parsed.backend == "gloo"
    reply = parse_ack(protocol.decode(protocol.encode(ack()), 1 << 20))
    assert isinstance(reply, protocol.Ack) and reply.store_port == 4000
    assert not reply.items and "items" not in ack()  # what an older source sends
    items = protocol.ack_message(protocol.Ack(SESSION, 4000, 1 << 20, "blake3-keyed", ("ff" * 32,), "aa" * 32, items=True))
    assert parse_ack(protocol.decode(protocol.encode(items), 1 << 20)).items
    refusal = parse_ack(protocol.nack_message("no\x00pe"))
    assert refusal == protocol.Refusal(busy=False, reason="no?pe")
    assert parse_ack(protocol.nack_message("full", busy=True)).busy
    done = protocol.parse_done(protocol.done_message(SESSION, False, "checksum"))
    assert done.reason == "checksum" and not done.ok


@pytest.mark.parametrize(
    "payload",
    [b"", b"\xff\xfe", b"[1,2]", b"{}", b'{"type": 5}', b"x" * 2000],
)
def test_garbage_payloads_are_protocol_errors(payload):
    with pytest.raises(protocol.ProtocolError):
        protocol.decode(payload, 1000)


@pytest.mark.parametrize(
    "changes",
    [
        {"v": 1},
        {"fingerprint": "not-hex"},
        {"fingerprint": 12},
        {"rank": -1},
        {"rank": True},
        {"manifest": {"tensors": "x", "aliases": []}},
        {"pg_host": "127.0.0.1"},  # a v1 field
        {"backend": "mpi"},
        {"max_bucket_bytes": 10},
        {"unexpected": 1},
    ],
)
def test_bad_hellos_are_rejected(changes):
    with pytest.raises(protocol.ProtocolError):
        protocol.parse_hello(hello(**changes))


@pytest.mark.parametrize(
    "changes",
    [
        {"type": "hello"},
        {"session": "xyz"},
        {"session": "0123456789abcdef"},  # 64 bits: too short to be the store's secret prefix
        {"store_port": 0},
        {"store_port": 70000},
        {"bucket_bytes": "big"},
        {"algorithm": "md5"},
        {"checksums": "ff"},
        {"checksums": [1]},
        {"manifest_digest": None},
        {"items": 1},
        {"items": "yes"},
        {"extra": True},
    ],
)
def test_bad_acks_are_rejected(changes):
    with pytest.raises(protocol.ProtocolError):
        parse_ack(ack(**changes))


def test_bad_done_and_refusals_are_rejected():
    with pytest.raises(protocol.ProtocolError):
        protocol.parse_done({"type": "done", "session": SESSION, "ok": "yes", "reason": None})
    with pytest.raises(protocol.ProtocolError):
        parse_ack({"type": "nack", "reason": 5})


def test_resume_and_skip_round_trip_as_ranges():
    resume = protocol.Resume.of(1 << 20, {0, 1, 2, 5, 7, 8})
    msg = protocol.hello_message("ab" * 32, 0, MANIFEST, "gloo", 1 << 20, resume)
    assert msg["resume"]["have"] == [[0, 3], [5, 6], [7, 9]]
    parsed = protocol.parse_hello(protocol.decode(protocol.encode(msg), 1 << 20))
    assert parsed.resume.indices(100) == {0, 1, 2, 5, 7, 8}
    assert parsed.resume.indices(6) == {0, 1, 2, 5}  # never beyond the real bucket count
    assert protocol.parse_hello(hello()).resume is None
    reply = parse_ack(ack(checksums=["ff"] * 4, skip=[[0, 2], [3, 4]]))
    assert reply.skip == {0, 1, 3}
    assert parse_ack(ack()).skip == frozenset()


@pytest.mark.parametrize(
    "have",
    [
        "0-3",
        [[0]],
        [[2, 1]],
        [[0, 3], [2, 5]],  # overlapping
        [[5, 6], [0, 1]],  # unsorted
        [[0, True]],
        [[-1, 2]],
        [[0, protocol.MAX_BUCKETS + 1]],
        [[i, i + 1] for i in range(0, 2 * protocol.MAX_RANGES + 2, 2)],
    ],
)
def test_bad_resume_ranges_are_rejected(have):
    with pytest.raises(protocol.ProtocolError):
        protocol.parse_hello(hello(resume={"bucket_bytes": 1 << 20, "have": have}))


@pytest.mark.parametrize("skip", [[[0, 2]], [[1, 1]], "all", [[0, 1], [0, 1]]])
def test_skip_beyond_the_checksums_or_malformed_is_rejected(skip):
    with pytest.raises(protocol.ProtocolError):
        parse_ack(ack(skip=skip))  # one checksum: only bucket 0 exists


def test_a_checksum_list_longer_than_our_plan_is_refused_before_it_is_parsed():
    seen = []

    def plan_of_three(bucket_bytes):
        seen.append(bucket_bytes)
        return 3

    huge = ack(checksums=[object()] * 100_000)  # entries that would fail if parsed
    with pytest.raises(protocol.ProtocolError, match="100000 for a plan of 3"):
        protocol.parse_reply(huge, plan_of_three)
    assert seen == [1 << 20]
