"""The sessions a source runs: one per admitted client, each on a thread of its own."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from loader.transfer import protocol
from loader.transfer.process_group import destroy_group


@dataclass(eq=False)
class Session:
    session_id: str
    identity: bytes
    hello: protocol.Hello
    bucket_bytes: int
    peer_address: str = ""
    group_up: bool = False  # process group set up: no longer counts as pending
    done: threading.Event = field(default_factory=threading.Event)
    done_message: protocol.Done | None = None
    pg: object | None = None
    thread: threading.Thread | None = None
    pieces: object | None = None  # reshard_serving.Pieces: a client of another shape
    last_ping: float | None = None  # monotonic time of the client's last ping, if it pings


class Sessions:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_id: dict[str, Session] = {}

    def admit(self, session: Session, busy: Callable[[list[Session]], str | None]) -> str | None:
        """Add `session` unless `busy(running sessions)` gives a reason (returned), as one
        step: two hellos at once cannot both take the last slot."""
        with self._lock:
            reason = busy(list(self._by_id.values()))
            if not reason:
                self._by_id[session.session_id] = session
            return reason

    def get(self, session_id: str) -> Session | None:
        with self._lock:
            return self._by_id.get(session_id)

    def mark_group_up(self, session: Session) -> None:
        with self._lock:
            session.group_up = True

    def remove(self, session: Session) -> None:
        with self._lock:
            self._by_id.pop(session.session_id, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_id)

    def heard_from(self, session_id: str, now: float) -> bool:
        """Note a ping of `session_id`; False if no such session runs."""
        with self._lock:
            session = self._by_id.get(session_id)
            if session is not None:
                session.last_ping = now
            return session is not None

    def silent(self, now: float, timeout_s: float) -> list[Session]:
        """Running sessions whose client pinged before, but not for `timeout_s`."""
        with self._lock:
            return [
                s for s in self._by_id.values()
                if s.last_ping is not None and now - s.last_ping > timeout_s and not s.done.is_set()
            ]

    def abort_all(self) -> list[Session]:
        """End every running session (its client sees the transfer fail); returns them."""
        with self._lock:
            sessions = list(self._by_id.values())
        for s in sessions:
            s.done.set()
            destroy_group(s.pg)
        return sessions


def join_sessions(sessions: list[Session], timeout_s: float, each: bool = False) -> None:
    """Wait for the sessions' threads (not the caller's own): at most `timeout_s` in all,
    or for each one when `each`."""
    deadline = time.monotonic() + timeout_s
    for s in sessions:
        if s.thread is not None and s.thread is not threading.current_thread():
            s.thread.join(timeout_s if each else max(0.0, deadline - time.monotonic()))
