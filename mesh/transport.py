"""ZeroMQ sockets for one agent: a ROUTER inbox and a bounded LRU of DEALERs out.

Used only from the agent's background thread (ZeroMQ sockets are not thread-safe).
Sends never block: a full queue or an unreachable peer drops the message, which
the protocol tolerates like packet loss.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict

import zmq

from .addresses import zmq_endpoint
from .codec import MAX_MESSAGE_BYTES
from .security import ClusterKeys, release_context, secure_client, secure_server

log = logging.getLogger(__name__)


class ZmqTransport:
    def __init__(
        self,
        bind_host: str,
        bind_port: int,
        keys: ClusterKeys | None,
        max_peers: int = 128,
        send_queue: int = 64,
    ) -> None:
        self.keys = keys
        self.max_peers = max_peers
        self.send_queue = send_queue
        self.context = zmq.Context()
        self.outbox: OrderedDict[str, zmq.Socket] = OrderedDict()
        self.dropped: Counter[str] = Counter()
        self.sent_bytes = 0
        try:
            self.inbox = self.context.socket(zmq.ROUTER)
            self.inbox.linger = 0
            self.inbox.maxmsgsize = MAX_MESSAGE_BYTES
            self.inbox.rcvhwm = 10000
            self.inbox.router_mandatory = False
            if ":" in bind_host:
                self.inbox.ipv6 = True
            secure_server(self.inbox, keys)
            host = f"[{bind_host}]" if ":" in bind_host else (bind_host or "*")
            self.inbox.bind(f"tcp://{host}:{bind_port if bind_port else '*'}")
            endpoint = self.inbox.getsockopt(zmq.LAST_ENDPOINT).decode()
            self.port = int(endpoint.rsplit(":", 1)[1])
        except Exception:
            self._close_all(0)
            raise

    def receive(self, timeout_ms: int, limit: int = 1000) -> list[tuple[bytes, bytes]]:
        """Up to `limit` (sender identity, payload) pairs; waits at most timeout_ms."""
        if not self.inbox.poll(timeout_ms):
            return []
        received = []
        while len(received) < limit:
            try:
                frames = self.inbox.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                break
            if len(frames) != 2:
                self.dropped["frames"] += 1
                continue
            received.append((frames[0], frames[1]))
        return received

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
        sock.reconnect_ivl = 100
        sock.reconnect_ivl_max = 2000
        if addr.startswith("["):
            sock.ipv6 = True
        secure_client(sock, self.keys)
        sock.connect(zmq_endpoint(addr))
        self.outbox[addr] = sock
        return sock

    def close(self, linger_ms: int = 0) -> None:
        self._close_all(linger_ms)

    def _close_all(self, linger_ms: int) -> None:
        for sock in self.outbox.values():
            sock.close(linger_ms)
        self.outbox.clear()
        inbox = getattr(self, "inbox", None)
        if inbox is not None:
            inbox.close(0)
        release_context(self.context)
        self.context.term()
