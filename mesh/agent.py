"""The agent loop: one member's protocol core driven over a Transport, without threads or
a clock of its own, so that the same loop runs in real time (mesh/api.py, one thread
over ZeroMQ) and in virtual time (mesh/sim.py).

Whoever drives it calls `step(now, inbound)` with what arrived, at the latest at
`wakeup_at()`. A step decodes and validates what arrived, answers status queries,
hands member messages to the core, spreads the latest advertised metadata (bursts of
updates become one new incarnation), runs the core's timers when due, logs membership
changes, keeps the member snapshot that queries read, notices when the agent has
joined, re-resolves the seeds while the agent is alone, and after `stop(leave=True)`
ends once the `left` announcement went out (or LEAVE_GRACE_S passed).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterable
from types import MappingProxyType

from .codec import Decoder, encode
from .core import MeshCore
from .entries import STATE_NAMES
from .member import Member
from .messages import StatusQuery, StatusReply
from .transport import Transport
from .view import ViewEvent

# tests/fleet parses the member changes logged here ("member X is suspect")
log = logging.getLogger(__name__)

SNAPSHOT_REFRESH_S = 0.2
SEED_RERESOLVE_S = 10.0
LEAVE_GRACE_S = 1.0

Snapshot = tuple[tuple[Member, ...], Member | None]  # every member by name, and ourselves


class AgentLoop:
    """`snapshot_refresh_s`: publish a fresh member snapshot at least this often (and on
    every view change), for readers in other threads; None builds it on demand instead,
    for a single-threaded driver. `resolve_seeds`: the seed addresses, asked again every
    SEED_RERESOLVE_S while no other member is alive (None: no seeds). `on_events`:
    called with the view changes of each step. `decoder` and `joined` may be the caller's,
    made before the loop."""

    def __init__(
        self,
        core: MeshCore,
        transport: Transport,
        now: float,
        resolve_seeds: Callable[[], list[str]] | None = None,
        snapshot_refresh_s: float | None = SNAPSHOT_REFRESH_S,
        on_events: Callable[[list[ViewEvent]], None] | None = None,
        decoder: Decoder | None = None,
        joined: threading.Event | None = None,
    ) -> None:
        self.core = core
        self.transport = transport
        self.resolve_seeds = resolve_seeds
        self.snapshot_refresh_s = snapshot_refresh_s
        self.on_events = on_events
        self.decoder = decoder if decoder is not None else Decoder()
        self.handler_errors = 0  # valid messages the core failed on (dropped)
        self.first_handler_error: Exception | None = None
        self.joined = joined if joined is not None else threading.Event()  # set once joined
        self._joined = False  # self.joined.is_set(), without the call in every step
        # core.next_deadline() while nothing changed the core since (None: ask it again)
        self._deadline: float | None = None
        self.now = now
        self.last_resolve = now
        self.leave_deadline: float | None = None
        self.stopping = False
        self.finished = False
        self._pending_meta: dict | None = None
        self._pending_notify: dict[str, None] = {}  # ordered set
        self._meta_lock = threading.Lock()
        self._snapshot: Snapshot = ((), None)
        self._snapshot_at = -math.inf
        self._snapshot_version = -1
        self._view_changed = threading.Condition()  # notified when a snapshot's view changed
        self._views_published = 0  # snapshots with a changed view so far (under _view_changed)
        if snapshot_refresh_s is not None:
            self._refresh_snapshot(now)

    # ------------------------------------------------------------- commands

    def advertise(self, meta: dict, notify: Iterable[str] = ()) -> None:
        """Replace our metadata at the next step (any thread may call this); `notify`:
        members to tell at once (core.advertise), kept across coalesced calls."""
        with self._meta_lock:
            self._pending_meta = meta
            self._pending_notify.update(dict.fromkeys(notify))

    def stop(self, now: float, leave: bool) -> None:
        """With `leave`, announce `left` and finish after the grace; otherwise finish now."""
        if self.stopping:
            return
        self.stopping = True
        self.now = now
        self._deadline = None
        if not leave:
            self.finished = True
            return
        self.send_all(self.core.leave(now))
        self.leave_deadline = now + LEAVE_GRACE_S
        self.report_events()

    def close(self, now: float) -> None:
        """Publish a last snapshot and close the transport (briefly lingering after a leave,
        so that the announcement leaves the host)."""
        self.finished = True
        self._refresh_snapshot(now)
        self.transport.close(linger_s=0.2 if self.leave_deadline is not None else 0.0)

    # ------------------------------------------------------------------ step

    def wakeup_at(self) -> float:
        """When the next step has timed work to do, whatever arrives before."""
        core = self.core
        wakeup = self._deadline
        if wakeup is None:
            wakeup = self._deadline = core.next_deadline()
        if self.leave_deadline is not None:
            wakeup = min(wakeup, self.leave_deadline)
        if self.snapshot_refresh_s is not None:
            wakeup = min(wakeup, self._snapshot_at + self.snapshot_refresh_s)
        if self.resolve_seeds is not None and core.view.alive_count <= 1:
            wakeup = min(wakeup, self.last_resolve + SEED_RERESOLVE_S)
        return wakeup

    def step(self, now: float, inbound: Iterable[tuple[object, bytes]]) -> None:
        """Handle `inbound` (reply handle, datagram) pairs, then whatever is due at `now`."""
        core = self.core
        self.now = now
        for handle, data in inbound:
            self._on_datagram(now, handle, data)
        if self._pending_meta is not None:
            with self._meta_lock:
                meta, self._pending_meta = self._pending_meta, None
                notify, self._pending_notify = list(self._pending_notify), {}
            self.send_all(core.advertise(now, meta, notify))
        deadline = self._deadline
        if deadline is None:
            deadline = core.next_deadline()
        if now >= deadline:
            self.send_all(core.tick(now))
            deadline = None
        if core.view.events:
            self.report_events()
        if self.snapshot_refresh_s is not None and (
            now - self._snapshot_at >= self.snapshot_refresh_s or self._snapshot_version != core.version
        ):
            self._refresh_snapshot(now)
        alone = core.view.alive_count <= 1
        if not self._joined and core.joined and not alone:
            self._joined = True
            self.joined.set()
        if alone and self.resolve_seeds is not None and now - self.last_resolve >= SEED_RERESOLVE_S:
            self.last_resolve = now
            core.set_seeds(self.resolve_seeds())
            deadline = None
        if self.leave_deadline is not None and (now >= self.leave_deadline or not core.rumors):
            self.finished = True
        self._deadline = deadline

    def _on_datagram(self, now: float, handle: object, data: bytes) -> None:
        msg = self.decoder.decode(data)
        if msg is None:
            return
        kind = type(msg)
        if kind is StatusQuery:
            rows = tuple(m.as_dict() for m in self.snapshot()[0])
            self.transport.reply(handle, encode(StatusReply(msg.query_id, self.core.name, rows)))
        elif kind is not StatusReply:
            self._deadline = None
            try:
                out = self.core.handle(now, msg)
            except Exception as exc:  # a message must never stop the agent: drop it, count it
                self.handler_errors += 1
                if self.first_handler_error is None:
                    self.first_handler_error = exc
                    log.exception("mesh agent %s: dropped a %s message that failed",
                                  self.core.name, type(msg).__name__)
                return
            if out:
                self.send_all(out)

    def send_all(self, out) -> None:
        """Encode and send the core's (addr, message) pairs."""
        self._deadline = None  # whatever produced them may have moved the core's deadlines
        send = self.transport.send
        for addr, msg in out:
            send(addr, encode(msg))

    def report_events(self) -> None:
        """Log the core's view changes and pass them to `on_events`."""
        events = self.core.drain_events()
        if not events:
            return
        if log.isEnabledFor(logging.INFO):
            for _, name, _old, new, inc in events:
                if name == self.core.name:
                    continue
                if new is None:
                    log.debug("member %s forgotten (tombstone expired)", name)
                else:
                    log.info("member %s is %s (incarnation %d)", name, STATE_NAMES[new], inc)
        if self.on_events is not None:
            self.on_events(events)

    # -------------------------------------------------------------- snapshot

    def snapshot(self) -> Snapshot:
        """Every member (by name) and ourselves, as of the last step. Published by the
        step (any thread may read it), or built here when snapshot_refresh_s is None."""
        if self.snapshot_refresh_s is None and (
            self._snapshot_at != self.now or self._snapshot_version != self.core.version
        ):
            self._refresh_snapshot(self.now)
        return self._snapshot

    def _refresh_snapshot(self, now: float) -> None:
        core = self.core
        members = []
        own = None
        for entry, info in core.members():
            is_self = entry.name == core.name
            if is_self:
                last_heard = 0.0
            else:
                last_heard = None if info.last_heard is None else max(0.0, now - info.last_heard)
            member = Member(
                name=entry.name,
                addr=entry.addr,
                state=STATE_NAMES[entry.state],
                incarnation=entry.incarnation,
                meta=MappingProxyType(dict(entry.meta)),
                rtt_s=info.rtt_s,
                last_heard_s=last_heard,
                is_self=is_self,
            )
            members.append(member)
            if is_self:
                own = member
        members.sort(key=lambda m: m.name)
        changed = core.version != self._snapshot_version
        self._snapshot = (tuple(members), own)
        self._snapshot_at = now
        self._snapshot_version = core.version
        if changed:
            with self._view_changed:
                self._views_published += 1
                self._view_changed.notify_all()

    @property
    def view_version(self) -> int:
        """How many snapshots with a changed view were published: read it before reading
        the snapshot, pass it to wait_for_change as `seen`."""
        return self._views_published

    def wait_for_change(self, timeout_s: float, seen: int | None = None) -> bool:
        """Block until a snapshot with a changed view (members, states, metadata) is
        published, at most `timeout_s`; whether one was. For readers in other threads.
        With `seen` (a view_version read before the reader's last look at the view), a
        change published since then returns at once instead of being missed."""
        with self._view_changed:
            start = self._views_published if seen is None else seen
            return self._view_changed.wait_for(lambda: self._views_published != start, timeout_s)
