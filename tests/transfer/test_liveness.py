"""SourceLiveness: pings while a transfer runs, a silent source presumed dead, aborts and
pongs of this session only; and the source's answer to a ping."""

from __future__ import annotations

import zmq

from loader.transfer import protocol
from loader.transfer.liveness import CLIENT_SILENCE_FACTOR, SourceLiveness

SESSION = "ab" * 16
OTHER = "cd" * 16


class FakeSocket:
    def __init__(self) -> None:
        self.inbox: list[bytes] = []
        self.sent: list[dict] = []
        self.connected = True

    def recv(self, flags=0) -> bytes:
        if not self.inbox:
            raise zmq.Again()
        return self.inbox.pop(0)

    def send(self, payload: bytes, flags=0) -> None:
        if not self.connected:
            raise zmq.Again()
        self.sent.append(protocol.decode(payload, 1 << 16))

    def deliver(self, msg: dict) -> None:
        self.inbox.append(protocol.encode(msg))


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def ack(ping: bool = True) -> protocol.Ack:
    return protocol.Ack(SESSION, 1234, 1 << 20, "nh32t2-blake3", (), "ee", ping=ping)


def liveness(sock, clock, ping=True) -> SourceLiveness:
    return SourceLiveness(sock, ack(ping), interval_s=0.5, timeout_s=3.0, clock=clock)


def test_a_source_that_answers_is_never_presumed_dead():
    sock, clock = FakeSocket(), Clock()
    watch = liveness(sock, clock)
    for _ in range(100):  # 50 s
        assert watch.poll() is None
        if sock.sent:
            sock.deliver(protocol.pong_message(sock.sent.pop()["session"]))
        clock.now += 0.5
    assert not sock.sent


def test_a_silent_source_is_presumed_dead_after_the_timeout_and_pinged_meanwhile():
    sock, clock = FakeSocket(), Clock()
    watch = liveness(sock, clock)
    reasons = []
    for _ in range(8):
        reasons.append(watch.poll())
        clock.now += 0.5
    assert reasons[:7] == [None] * 7 and "presumed dead" in reasons[7]
    assert [m["type"] for m in sock.sent] == ["ping"] * 7
    assert {m["session"] for m in sock.sent} == {SESSION}


def test_a_client_that_could_not_run_for_a_while_does_not_blame_the_source():
    # the bench-source failure: the client's watchdog thread got no CPU (or no GIL) for
    # longer than the timeout; silence counts from a ping it actually sent
    sock, clock = FakeSocket(), Clock()
    watch = liveness(sock, clock)
    assert watch.poll() is None
    sock.deliver(protocol.pong_message(sock.sent.pop()["session"]))
    clock.now += 0.1
    assert watch.poll() is None  # reads the pong; no ping due yet
    assert not sock.sent
    clock.now += 10.0  # starved: no poll, no ping
    assert watch.poll() is None  # nothing was asked in the meantime: a new ping leaves now
    assert [m["type"] for m in sock.sent] == ["ping"]
    clock.now += 3.5  # and this one the source never answers
    assert "presumed dead" in watch.poll()


def test_pongs_of_another_session_and_garbage_are_no_sign_of_life():
    sock, clock = FakeSocket(), Clock()
    watch = liveness(sock, clock)
    for _ in range(8):
        sock.deliver(protocol.pong_message(OTHER))
        sock.inbox.append(b"\xff not json")
        sock.deliver({"type": "pong"})
        reason = watch.poll()
        clock.now += 0.5
    assert reason is not None and "presumed dead" in reason


def test_an_unreachable_source_is_presumed_dead_too():
    sock, clock = FakeSocket(), Clock()
    sock.connected = False  # every ping fails to send
    watch = liveness(sock, clock)
    assert watch.poll() is None  # the first ping fails to leave: silence counts from it
    clock.now += 3.5
    assert "presumed dead" in watch.poll()


def test_an_abort_of_this_session_ends_the_transfer_with_its_reason():
    sock, clock = FakeSocket(), Clock()
    watch = liveness(sock, clock)
    sock.deliver(protocol.abort_message(OTHER, "not yours"))
    assert watch.poll() is None
    sock.deliver(protocol.abort_message(SESSION, "relay's upstream failed"))
    assert watch.poll() == "relay's upstream failed"


def test_a_source_that_predates_pings_is_not_pinged_nor_timed_out():
    sock, clock = FakeSocket(), Clock()
    watch = liveness(sock, clock, ping=False)
    clock.now += 1000
    assert watch.poll() is None and not sock.sent


def test_ack_carries_streams_and_ping_and_an_old_ack_means_one_stream_no_ping():
    full = protocol.Ack(SESSION, 1234, 1 << 20, "nh32t2-blake3", ("aa",), "ee", streams=2, ping=True)
    wire = protocol.decode(protocol.encode(protocol.ack_message(full)), 1 << 16)
    assert protocol.parse_reply(wire, lambda _: 1) == full
    old = dict(wire)
    del old["streams"], old["ping"]
    parsed = protocol.parse_reply(old, lambda _: 1)
    assert parsed.streams == 1 and parsed.ping is False


def test_malformed_streams_and_ping_fields_are_refused():
    import pytest

    base = protocol.ack_message(protocol.Ack(SESSION, 1234, 1 << 20, "nh32t2-blake3", ("aa",), "ee"))
    for field, value in (("streams", 0), ("streams", 9), ("streams", "2"), ("ping", 1), ("ping", "yes")):
        with pytest.raises(protocol.ProtocolError, match=field):
            protocol.parse_reply({**base, field: value}, lambda _: 1)


def test_the_source_answers_a_ping_for_a_session_it_does_not_hold_with_an_abort():
    from loader.transfer.client import open_control_socket
    from mesh.addresses import split_host_port
    from tests.transfer.helpers import FAST, in_process_server, make_tensors

    with in_process_server(make_tensors(0)) as server:
        host, port = split_host_port(server.endpoint)
        context = zmq.Context()
        sock = open_control_socket(context, host, port, FAST, None)
        try:
            sock.send(protocol.encode(protocol.ping_message(OTHER)))
            assert sock.poll(5000)
            reply = protocol.decode(sock.recv(), 1 << 16)
        finally:
            sock.close(0)
            context.term()
    assert protocol.parse_abort(reply) == (OTHER, "the source holds no such session")


def test_a_source_ends_the_sessions_of_clients_that_stopped_pinging_and_only_those():
    from loader.transfer.sessions import Session
    from tests.transfer.helpers import FAST, in_process_server, make_tensors

    destroyed = []
    with in_process_server(make_tensors(0)) as server:
        import loader.transfer.server as server_module

        real = server_module.destroy_group
        server_module.destroy_group = destroyed.append
        try:
            sessions = {
                name: Session(sid * 16, b"id", None, 1 << 20, pg=name)
                for name, sid in (("silent", "11"), ("pinging", "22"), ("old client", "33"),
                                  ("briefly silent", "44"))
            }
            for s in sessions.values():
                server._sessions.admit(s, lambda running: None)
            import time

            now = time.monotonic()
            sessions["silent"].last_ping = now - CLIENT_SILENCE_FACTOR * FAST.silence_timeout_s - 1
            server._sessions.heard_from("22" * 16, now)
            # silent as long as a client waits for its source: it may only have been starved
            sessions["briefly silent"].last_ping = now - FAST.silence_timeout_s - 0.5
            server._end_silent_sessions()
        finally:
            server_module.destroy_group = real
            for s in sessions.values():
                server._sessions.remove(s)
    assert destroyed == ["silent"]
    assert sessions["silent"].done.is_set()
    assert not sessions["pinging"].done.is_set() and not sessions["old client"].done.is_set()
    assert not sessions["briefly silent"].done.is_set()
