"""Transport bounds: message size on every socket, a bounded receive queue that drops and counts."""

import time

import pytest
import zmq

from mesh.codec import MAX_MESSAGE_BYTES
from mesh.transport import ReceiveQueue, ZmqTransport


def test_receive_queue_is_bounded_in_messages_and_bytes_and_keeps_order():
    queue = ReceiveQueue(max_messages=4, max_bytes=100)
    assert [queue.put(b"id", bytes([i])) for i in range(6)] == [True] * 4 + [False] * 2
    assert len(queue) == 4 and queue.bytes == 4
    assert [data for _, data in queue.take(3)] == [b"\x00", b"\x01", b"\x02"]
    assert queue.put(b"id", b"x" * 90) and not queue.put(b"id", b"x" * 10)  # 1 + 90 + 10 > 100
    assert [len(data) for _, data in queue.take(10)] == [1, 90]
    assert len(queue) == 0 and queue.bytes == 0 and queue.take(10) == []


def test_every_socket_refuses_messages_over_the_limit():
    transport = ZmqTransport("127.0.0.1", 0, None)
    try:
        assert transport.inbox.maxmsgsize == MAX_MESSAGE_BYTES
        out = transport._connect("127.0.0.1:9")
        assert out.maxmsgsize == MAX_MESSAGE_BYTES
    finally:
        transport.close()


def _wait(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)
    return predicate()


@pytest.mark.loopback
def test_a_flood_is_dropped_and_counted_not_queued_without_bound():
    transport = ZmqTransport("127.0.0.1", 0, None, receive_queue=ReceiveQueue(max_messages=10))
    context = zmq.Context()
    sender = context.socket(zmq.DEALER)
    sender.linger = 0
    try:
        sender.connect(f"tcp://127.0.0.1:{transport.port}")
        for i in range(50):
            sender.send(b"m%d" % i)
        # only fill the queue (take nothing) until every message was seen
        assert _wait(lambda: transport.receive(0.05, limit=0) == [] and
                     len(transport.received) + transport.dropped["receive queue full"] == 50)
        assert len(transport.received) == 10
        assert [data for _, data in transport.receive(0, limit=4)] == [b"m%d" % i for i in range(4)]
        assert len(transport.receive(0)) == 6 and transport.receive(0) == []
    finally:
        sender.close(0)
        context.term()
        transport.close()


def test_wake_ends_a_waiting_receive_from_another_thread_and_is_harmless_after_close():
    import threading

    transport = ZmqTransport("127.0.0.1", 0, None)
    returned = threading.Event()

    def wait_long():
        transport.receive(600.0)
        returned.set()

    waiter = threading.Thread(target=wait_long, daemon=True)
    try:
        waiter.start()
        for _ in range(3):  # a burst of wake-ups is one, and none is left pending after
            transport.wake()
        assert returned.wait(30), "wake() did not end the receive"
        waiter.join(5)
        assert transport.receive(0) == []
    finally:
        transport.close()
    transport.wake()  # closed: neither raises nor writes to a (reused) descriptor


def test_closing_twice_is_harmless():
    transport = ZmqTransport("127.0.0.1", 0, None)
    transport.close()
    transport._close_all(0)  # e.g. a failed start cleaning up after a close
