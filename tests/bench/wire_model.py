"""Bytes a gossip datagram costs on the wire with CURVE on, from its payload size.

The simulator counts payload only. A real agent sends each datagram as one ZeroMQ message
on a DEALER connection (an LRU of `max_peers` per agent) encrypted with CURVE, over TCP:

- CURVE wraps every ZMTP frame in a MESSAGE command: a frame header (2 bytes, or 9 above
  255), the command name (8), a short nonce (8), the Poly1305 tag (16) and a flags byte.
- Each datagram is one TCP segment (gossip messages stay well under an Ethernet MSS; the
  agent sets no batching) with 52 bytes of IPv4+TCP headers (timestamps on), and each is
  answered by a pure ACK of 52 bytes (an upper bound: delayed ACKs can halve them).
- A send to a peer without an open connection first pays for one: TCP handshake and
  teardown, ZMTP greetings and the CURVE HELLO/WELCOME/INITIATE/READY exchange, each
  command in its own segment with its ACK. CONNECT_BYTES adds those up.

These are IP-layer bytes; Ethernet framing adds 38 bytes per segment on a real link.
`tests/bench/mesh_processes.py` measures the same quantity from real agents (socket bytes
plus headers per segment), which is how this model is checked.
"""

from __future__ import annotations

from collections import Counter, OrderedDict

TCP_IP_HEADER = 52
_CURVE_MESSAGE_BODY = 1 + 7 + 8 + 16 + 1  # name length, "MESSAGE", nonce, tag, flags

_GREETING = 64
_HELLO, _WELCOME, _INITIATE, _READY = 200, 168, 279, 52  # command bodies with DEALER/ROUTER metadata
_HANDSHAKE_SEGMENTS = 3 + 4  # SYN, SYN-ACK, ACK; FIN and ACK from each side
CONNECT_BYTES = (
    2 * _GREETING
    + sum(body + (2 if body <= 255 else 9) for body in (_HELLO, _WELCOME, _INITIATE, _READY))
    + (_HANDSHAKE_SEGMENTS + 2 * 6) * TCP_IP_HEADER  # 6 handshake messages, each with its ACK
)


def message_bytes(payload: int) -> int:
    """IP-layer bytes of one datagram of `payload` bytes on an open connection, with its ACK."""
    body = _CURVE_MESSAGE_BODY + payload
    frame = body + (2 if body <= 255 else 9)
    return frame + 2 * TCP_IP_HEADER


def message_type(data: bytes) -> str:
    """The "t" field of an encoded message, without decoding it."""
    start = data.find(b'"t":"')
    if start < 0:
        return "?"
    start += 5
    return data[start:data.find(b'"', start)].decode("ascii", "replace")


class WireMeter:
    """The simulator's send hook: wire bytes per sender, with each sender's connection LRU."""

    def __init__(self, max_peers: int = 128) -> None:
        self.max_peers = max_peers
        self.bytes = 0
        self.connects = 0
        self.by_type: Counter[str] = Counter()  # wire bytes per message type ("ping", "gos", ...)
        self._open: dict[str, OrderedDict[str, None]] = {}

    def on_send(self, sender: str, addr: str, data: bytes) -> None:
        peers = self._open.setdefault(sender, OrderedDict())
        if addr in peers:
            peers.move_to_end(addr)
        else:
            if len(peers) >= self.max_peers:
                peers.popitem(last=False)
            peers[addr] = None
            self.connects += 1
            self.bytes += CONNECT_BYTES
            self.by_type["connect"] += CONNECT_BYTES
        size = message_bytes(len(data))
        self.bytes += size
        self.by_type[message_type(data)] += size

    def forget(self, sender: str) -> None:
        """A crashed or restarted process: its connections are gone."""
        self._open.pop(sender, None)
