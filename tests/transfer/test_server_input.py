"""The weight server treats every control message as untrusted and keeps serving."""

import orjson
import pytest
import torch
import zmq

from loader.transfer import protocol
from loader.transfer.manifest import build_manifest
from loader.transfer.server import WeightServer
from tests.transfer.helpers import FAST, FINGERPRINT

pytestmark = pytest.mark.timeout(120)

TENSORS = {"w": torch.arange(10, dtype=torch.float32)}


@pytest.fixture
def server():
    s = WeightServer(TENSORS, FINGERPRINT, 0, FAST, host="127.0.0.1")
    s.start()
    yield s
    s.stop()


@pytest.fixture
def dealer(server):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://{server.endpoint}")
    yield sock
    sock.close(0)
    ctx.term()


def ask(sock, *frames) -> dict:
    sock.send_multipart(list(frames))
    assert sock.poll(10_000), "server did not answer"
    return orjson.loads(sock.recv())


def hello(**changes) -> bytes:
    msg = protocol.hello_message(FINGERPRINT, 0, build_manifest(TENSORS), "gloo", 1 << 20)
    msg.update(changes)
    return orjson.dumps(msg)


@pytest.mark.parametrize(
    "payload",
    [
        b"\x00\xff garbage",
        b"[]",
        b'{"type": "shutdown"}',
        b'{"type": "hello"}',
        hello(rank="0"),
        hello(manifest={"tensors": [["w", "float32", [10], -1]], "aliases": []}),
        hello(v=99),
    ],
)
def test_malformed_requests_get_a_nack_and_are_counted(server, dealer, payload):
    reply = ask(dealer, payload)
    assert reply["type"] == "nack" and reply["reason"].startswith("bad request")
    assert server.bad_messages == 1
    # the server still answers a well-formed request afterwards
    good = ask(dealer, hello(fingerprint="cd" * 32))
    assert good["type"] == "nack" and "fingerprint mismatch" in good["reason"]


def test_multipart_and_unknown_done_are_ignored_but_counted(server, dealer):
    dealer.send_multipart([b"a", b"b"])
    dealer.send(orjson.dumps({"type": "done", "session": "ab" * 16, "ok": True, "reason": None}))
    reply = ask(dealer, hello(rank=3))
    assert reply["type"] == "nack" and reply["reason"].startswith("rank mismatch")
    assert server.bad_messages == 2
    assert server.active_clients == 0


def test_manifest_mismatch_is_refused_before_any_session(server, dealer):
    other = build_manifest({"w": torch.zeros(11)})
    reply = ask(dealer, hello(manifest=other.to_wire()))
    assert reply["type"] == "nack"
    assert reply["reason"].startswith("manifest mismatch: tensor 'w': shape differs")
    assert server.active_clients == 0
