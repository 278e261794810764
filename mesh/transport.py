"""What the agent loop needs from a network (Transport), and its ZeroMQ implementation:
a ROUTER inbox and a bounded LRU of DEALERs out (the simulator has its own, mesh/sim.py).

ZmqTransport is used only from the agent's thread (ZeroMQ sockets are not thread-safe).
Sends never block: a full queue or an unreachable peer drops the message, which
the protocol tolerates like packet loss. Receiving never blocks either: what arrives
moves from the socket to a queue bounded in messages and bytes, which hands the core
at most a batch at a time; what does not fit is dropped and counted. ZeroMQ itself
refuses (and disconnects) a peer sending a message over MAX_MESSAGE_BYTES.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter, OrderedDict, deque
from typing import Protocol

import zmq

from .addresses import zmq_endpoint
from .codec import MAX_MESSAGE_BYTES
from .security import ClusterKeys, close_context, secure_client, secure_server

log = logging.getLogger(__name__)


class Transport(Protocol):
    """Unreliable datagrams between members, "host:port" addressed. Nothing blocks but
    `receive`, for at most its timeout; what cannot be sent is dropped (the protocol
    treats it as loss). Each datagram received comes with a handle to reply through
    (a status query comes from a client that is no member, with no address of its own)."""

    def send(self, addr: str, data: bytes) -> None: ...

    def reply(self, handle: object, data: bytes) -> None: ...

    def receive(self, timeout_s: float, limit: int = 256) -> list[tuple[object, bytes]]: ...

    def wake(self) -> None:
        """Make a waiting `receive` return now; the only method other threads may call."""

    def close(self, linger_s: float = 0.0) -> None: ...


class ReceiveQueue:
    """FIFO of (sender identity, payload) holding at most `max_messages` messages and
    `max_bytes` payload bytes; put() refuses (returns False) instead of growing."""

    def __init__(self, max_messages: int = 4096, max_bytes: int = 32 * MAX_MESSAGE_BYTES) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.items: deque[tuple[bytes, bytes]] = deque()
        self.bytes = 0

    def put(self, identity: bytes, data: bytes) -> bool:
        if len(self.items) >= self.max_messages or self.bytes + len(data) > self.max_bytes:
            return False
        self.items.append((identity, data))
        self.bytes += len(data)
        return True

    def take(self, limit: int) -> list[tuple[bytes, bytes]]:
        """The oldest `limit` messages (fewer if fewer are queued)."""
        batch = []
        while self.items and len(batch) < limit:
            item = self.items.popleft()
            self.bytes -= len(item[1])
            batch.append(item)
        return batch

    def __len__(self) -> int:
        return len(self.items)


class ZmqTransport(Transport):
    def __init__(
        self,
        bind_host: str,
        bind_port: int,
        keys: ClusterKeys | None,
        max_peers: int = 128,
        send_queue: int = 64,
        receive_queue: ReceiveQueue | None = None,
    ) -> None:
        self.keys = keys
        self.max_peers = max_peers
        self.send_queue = send_queue
        self.received = receive_queue if receive_queue is not None else ReceiveQueue()
        self.context = zmq.Context()
        self.outbox: OrderedDict[str, zmq.Socket] = OrderedDict()
        self.dropped: Counter[str] = Counter()
        self.sent_bytes = 0
        try:
            self.inbox = self.context.socket(zmq.ROUTER)
            self.inbox.linger = 0
            self.inbox.maxmsgsize = MAX_MESSAGE_BYTES
            self.inbox.rcvhwm = 1000
            self.inbox.router_mandatory = False
            if ":" in bind_host:
                self.inbox.ipv6 = True
            secure_server(self.inbox, keys)
            host = f"[{bind_host}]" if ":" in bind_host else (bind_host or "*")
            self.inbox.bind(f"tcp://{host}:{bind_port if bind_port else '*'}")
            endpoint = self.inbox.getsockopt(zmq.LAST_ENDPOINT).decode()
            self.port = int(endpoint.rsplit(":", 1)[1])
            # wake(): a pipe, not a socket, because any thread may write to it; the lock
            # keeps a late wake() from writing to the number of a closed (reused) fd
            self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self._wake_lock = threading.Lock()
            self.poller = zmq.Poller()
            self.poller.register(self.inbox, zmq.POLLIN)
            self.poller.register(self._wake_read, zmq.POLLIN)
        except Exception:
            self._close_all(0)
            raise

    def receive(self, timeout_s: float, limit: int = 256) -> list[tuple[bytes, bytes]]:
        """Up to `limit` (sender identity, payload) pairs, oldest first; waits at most
        timeout_s, and only when nothing is queued; wake() ends the wait early."""
        if len(self.received):
            self._drain()
        else:
            ready = dict(self.poller.poll(int(timeout_s * 1000)))
            if self._wake_read in ready:
                self._clear_wakeups()
            if self.inbox in ready:
                self._drain()
        return self.received.take(limit)

    def wake(self) -> None:
        """End a `receive` waiting in the agent's thread now (any thread may call this):
        the loop then applies what was just asked of it, e.g. new metadata, at once."""
        with self._wake_lock:
            if self._wake_write is None:
                return  # closed
            try:
                os.write(self._wake_write, b"\0")
            except OSError:
                pass  # the pipe is full: a wake-up is pending anyway

    def _clear_wakeups(self) -> None:
        try:
            while os.read(self._wake_read, 4096):
                pass
        except OSError:  # BlockingIOError: drained
            pass

    def _drain(self) -> None:
        """Move what the socket holds (at most one queue's worth per call) to the queue."""
        for _ in range(self.received.max_messages):
            try:
                frames = self.inbox.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                break
            if len(frames) != 2:
                self.dropped["frames"] += 1
            elif not self.received.put(frames[0], frames[1]):
                self.dropped["receive queue full"] += 1

    def reply(self, identity: bytes, data: bytes) -> None:
        try:
            self.inbox.send_multipart([identity, data], zmq.NOBLOCK)
        except zmq.ZMQError:
            self.dropped["reply"] += 1

    def send(self, addr: str, data: bytes) -> None:
        sock = self.outbox.get(addr)
        if sock is None:
            sock = self._connect(addr)
        else:
            self.outbox.move_to_end(addr)
        try:
            sock.send(data, zmq.NOBLOCK)
            self.sent_bytes += len(data)
        except zmq.Again:
            self.dropped["queue full"] += 1
        except zmq.ZMQError:
            self.dropped["send error"] += 1

    def _connect(self, addr: str) -> zmq.Socket:
        while len(self.outbox) >= self.max_peers:
            _, old = self.outbox.popitem(last=False)
            old.close(0)
        sock = self.context.socket(zmq.DEALER)
        sock.linger = 0
        sock.sndhwm = self.send_queue
        sock.maxmsgsize = MAX_MESSAGE_BYTES
        sock.rcvhwm = 1  # nothing is ever read from these
        sock.reconnect_ivl = 100
        sock.reconnect_ivl_max = 2000
        if addr.startswith("["):
            sock.ipv6 = True
        secure_client(sock, self.keys)
        sock.connect(zmq_endpoint(addr))
        self.outbox[addr] = sock
        return sock

    def close(self, linger_s: float = 0.0) -> None:
        self._close_all(linger_s)

    def _close_all(self, linger_s: float) -> None:
        for sock in self.outbox.values():
            sock.close(int(linger_s * 1000))
        self.outbox.clear()
        inbox = getattr(self, "inbox", None)
        if inbox is not None:
            inbox.close(0)
        lock = getattr(self, "_wake_lock", None)
        if lock is not None:
            with lock:
                if self._wake_write is not None:  # not closed before
                    os.close(self._wake_read)
                    os.close(self._wake_write)
                    self._wake_read = self._wake_write = None
        close_context(self.context)  # sockets closed above keep their linger
