"""Is the source still there? A source whose host crashed (or whose last packets a full
queue dropped) sends no FIN and no RST: the client's posted receives would wait out the
bucket timeout (60 s by default) before the load moves on. So while a transfer runs, the
client pings the source over the control channel every `ping_interval_s`; the source's
control thread answers at once (whatever its sending thread is blocked on: a relay
waiting for its own upstream still answers), and a source silent for
`silence_timeout_s` is presumed dead: silence counts from the oldest ping still unanswered,
not from the last pong, so a client that could not run for a while (a busy host, its
GIL held elsewhere) sends a ping before it can blame the source. The attempt then ends like any failed one:
its group is fenced, and the next source resumes from the buckets verified so far, so a
false alarm costs little. Sources that predate pings (no `ping` in the ack) are not pinged.
The other way round, a source ends the session of a client that pinged and then fell
silent for CLIENT_SILENCE_FACTOR times as long (WeightServer, on its control thread),
freeing its slot: the source cannot tell a dead client from one that could not run, so it
waits longer (ending a live client's session costs a retry; holding a dead one's slot a
little longer costs nothing).
"""

from __future__ import annotations

import time

import zmq

from loader.transfer import protocol

_MAX_REPLY_BYTES = 1 << 16
CLIENT_SILENCE_FACTOR = 4


class SourceLiveness:
    """The watchdog's `interrupt` for one attempt: polled from the attempt's control
    thread (the only reader of `sock`); returns a reason to abandon the transfer."""

    def __init__(
        self, sock: zmq.Socket, ack: protocol.Ack, interval_s: float, timeout_s: float,
        clock=time.monotonic,
    ) -> None:
        self._sock = sock
        self._ack = ack
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._clock = clock
        self._unanswered_since: float | None = None  # when the oldest unanswered ping left
        self._last_sent = float("-inf")

    def poll(self) -> str | None:
        reason = self._read_replies()
        if reason is not None or not self._ack.ping:
            return reason
        now = self._clock()
        if self._unanswered_since is not None and now - self._unanswered_since > self._timeout_s:
            return f"source silent for {self._timeout_s:g}s (no answer to pings): presumed dead"
        if now - self._last_sent >= self._interval_s:
            self._last_sent = now
            if self._unanswered_since is None:
                self._unanswered_since = now
            try:
                self._sock.send(protocol.encode(protocol.ping_message(self._ack.session)), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # no connection right now: the silence is what counts
        return None

    def _read_replies(self) -> str | None:
        """An abort's reason; pongs of this session count as signs of life (other and
        malformed messages are dropped)."""
        while True:
            try:
                payload = self._sock.recv(zmq.NOBLOCK)
            except zmq.ZMQError:
                return None
            try:
                msg = protocol.decode(payload, _MAX_REPLY_BYTES)
                if msg["type"] == "pong":
                    if protocol.parse_pong(msg) == self._ack.session:
                        self._unanswered_since = None
                    continue
                session, reason = protocol.parse_abort(msg)
            except protocol.ProtocolError:
                continue
            if session == self._ack.session:
                return reason
