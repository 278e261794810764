"""SWIM + Lifeguard membership as a pure state machine.

Inputs are `handle(now, msg)` (a typed message from mesh/messages.py, already
validated by the codec) and `tick(now)`; both return the messages to send as
(addr, message) pairs, which the codec encodes. The core never reads a clock, sleeps
or touches a socket; randomness comes from the injected `random.Random`, so the
simulator runs it deterministically in virtual time.

This module merges claims into the view and runs the timers; each mechanism lives in a
module of its own:
- the view and its indexes (mesh/view.py);
- failure detection: randomized round-robin probes, indirect probes through k helpers
  plus a second direct ping, nacks (mesh/probing.py);
- suspicion with a timeout that starts at max and shrinks towards min as up to k
  independent accusers confirm it (Lifeguard, mesh/suspicion.py); a suspect refutes by
  bumping its incarnation;
- local health: a member that misses acks/nacks itself probes more slowly and waits
  longer instead of accusing others (Lifeguard, mesh/awareness.py);
- dissemination: updates piggybacked on pings/acks and gossiped to `gossip_fanout`
  members every `gossip_interval_s` while any are pending, each sent
  retransmit_mult*ceil(log10(N+1)) times; nothing is gossiped when nothing changed
  (mesh/rumors.py); a metadata change travels as its changed keys (a MetaUpdate, on
  gossip messages only), which a member holding the previous incarnation rebuilds and
  any other asks the sender for whole (a Delta naming it);
- anti-entropy every `sync_interval_s`: one 64-bit view hash (on the next probe's ping
  when the chosen member is alive, in a Sync of its own to a dead one), and only on a
  mismatch a digest and then the differing entries (mesh/antientropy.py);
- join by pushing our entry to seeds, graceful leave (`left`), tombstones expire;
- claims from the network are untrusted: incredible incarnation jumps and address
  changes of live members are refused and counted in `dropped` (mesh/claims.py).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import replace

from . import antientropy
from .awareness import Awareness
from .claims import ClaimFilter
from .codec import MAX_INCARNATION, Invalid, entry_size, validate_meta
from .config import ProtocolConfig
from .entries import ALIVE, DEAD, LEFT, SUSPECT, Entry, MetaUpdate, meta_changes
from .messages import (
    Ack,
    Delta,
    Digest,
    Gossip,
    MemberMessage,
    Nack,
    Ping,
    PingReq,
    PushState,
    Sync,
)
from .probing import Prober
from .rumors import RumorQueue
from .suspicion import Suspicions, suspicion_bounds
from .view import LocalInfo, View, ViewEvent

NOTIFY_LIMIT = 32  # members told of one metadata change at once (advertise)

__all__ = ["MeshCore", "ProtocolConfig"]

Out = tuple[str, MemberMessage]


class MeshCore:
    def __init__(self, name: str, addr: str, now: float, rng: random.Random, meta: dict | None = None,
                 seeds: list[str] | None = None, config: ProtocolConfig | None = None) -> None:
        self.name = name
        self.addr = addr
        self.rng = rng
        self.config = c = config or ProtocolConfig()
        self.incarnation = 0
        self.heard_of_self = False  # has any claim about us arrived yet (see _apply_own)
        self.meta = validate_meta(dict(meta or {}))
        self.leaving = False
        self.last_advertise_push = -math.inf
        self.joined = False
        self.seeds: list[str] = []
        self.view = View(name)
        self.rumors = RumorQueue(c.retransmit_mult, c.piggyback_bytes)
        self.suspicions = Suspicions()
        self.asked: dict[str, int] = {}  # member -> incarnation whose whole entry we asked for
        # the metadata of members suspected at the incarnation we held them alive at (the
        # suspect entry carries none): the base of the empty MetaUpdate a refutation sends
        self.suspect_meta: dict[str, tuple[int, dict]] = {}
        self.awareness = Awareness(c.awareness_max, enabled=c.lifeguard)
        self.claims = ClaimFilter(name)
        self.dropped = self.claims.dropped  # refused claims by reason
        self.prober = Prober(name, addr, now, rng, c, self.view, self.awareness, self.rumors)
        self.next_gossip_at = now
        self.next_sync_at = now + rng.uniform(0.5, 1.0) * c.sync_interval_s
        self.next_join_at = now
        self.join_backoff_s = c.join_retry_s
        self._install(now, Entry(name, addr, 0, ALIVE, self.meta), rumor=True)
        self.set_seeds(seeds or [])
        p = self.prober
        self._handlers = {Ping: p.on_ping, Ack: p.on_ack, Nack: p.on_nack, PingReq: p.on_ping_req,
                          Gossip: self._on_gossip, Sync: self._on_sync, Digest: self._on_digest,
                          Delta: self._on_delta, PushState: self._on_push}

    @property
    def view_hash(self) -> int:
        return self.view.hash

    @property
    def version(self) -> int:
        """Bumped on every view change; lets readers cache snapshots."""
        return self.view.version

    @property
    def alive_count(self) -> int:
        return self.view.alive_count

    # ------------------------------------------------------------------ inputs

    def set_seeds(self, seeds: list[str]) -> None:
        self.seeds = [s for s in dict.fromkeys(seeds) if s != self.addr]

    def tick(self, now: float) -> list[Out]:
        out: list[Out] = []
        if not self.leaving:
            self.prober.tick(now, out, self._accuse)
            self.prober.help_tick(now, out)
            self._suspicion_tick(now)
        self._gossip_tick(now, out)
        if not self.leaving:
            self._sync_tick(now, out)
            self._join_tick(now, out)
        return out

    def next_deadline(self) -> float:
        # (comparisons rather than min(): this runs once or twice per message)
        deadline = self.next_gossip_at if self.rumors else math.inf
        if self.leaving:
            return deadline
        if self.next_sync_at < deadline:
            deadline = self.next_sync_at
        probe_deadline = self.prober.next_deadline()
        if probe_deadline < deadline:
            deadline = probe_deadline
        if self.suspicions:
            deadline = min(deadline, self.suspicions.next_deadline())
        if self.seeds and self.next_join_at < deadline and (not self.joined or self.view.alive_count <= 1):
            deadline = self.next_join_at
        return deadline

    def handle(self, now: float, msg: MemberMessage) -> list[Out]:
        out: list[Out] = []
        handler = self._handlers.get(type(msg))
        if handler is None or self.leaving or msg.sender == self.name:
            return out
        info = self.view.local.get(msg.sender)
        if info is not None:
            info.last_heard = now
        self.joined = True
        if type(msg) in _PIGGYBACKED:
            unresolved = [entry for entry in msg.updates if not self._apply(now, entry, gossip=True)]
            wanted = [update.name for update in unresolved if self._first_ask(update)]
            if wanted:
                self._ask_whole_entries(msg, wanted, out)
        handler(now, msg, out)
        if type(msg) is Ping and msg.view_hash is not None:
            self._on_sync(now, Sync(msg.sender, msg.sender_addr, msg.view_hash), out)
        return out

    def advertise(self, now: float, meta: dict, notify: Iterable[str] = ()) -> list[Out]:
        """Replace our metadata; spread it with a higher incarnation, to a few members at
        once (a starting instance waits on these updates), at most once per gossip
        interval; later ticks carry it on. `notify`: members waiting on this change, told
        at once whatever the interval (at most NOTIFY_LIMIT, alive or suspect ones); the
        change stays a rumor for the others."""
        previous = self.view.entries[self.name]
        self.meta = validate_meta(dict(meta))
        self._bump_incarnation(self.incarnation)
        entry = self._own_entry()
        self._install(now, entry, rumor=False)
        update = self._meta_update(previous, entry)
        self._queue_rumor(update)
        out: list[Out] = []
        for name in list(dict.fromkeys(notify))[:NOTIFY_LIMIT]:
            target = self.view.entries.get(name)
            if name != self.name and target is not None and target.state in (ALIVE, SUSPECT):
                out.append((target.addr, Gossip(self.name, (update,))))
        if now - self.last_advertise_push >= self.config.gossip_interval_s:
            self.last_advertise_push = now
            self._push_rumors(out, self.config.gossip_fanout)
        return out

    def leave(self, now: float) -> list[Out]:
        """Announce `left` to a few members now; keep gossiping it on later ticks."""
        if self.leaving:
            return []
        self._bump_incarnation(self.incarnation)
        self._install(now, Entry(self.name, self.addr, self.incarnation, LEFT), rumor=True)
        self.leaving = True
        out: list[Out] = []
        self._push_rumors(out, self.config.gossip_fanout + 2)
        return out

    def drain_events(self) -> list[ViewEvent]:
        return self.view.drain_events()

    def members(self) -> list[tuple[Entry, LocalInfo]]:
        local = self.view.local
        return [(e, local[n]) for n, e in self.view.entries.items()]

    # ---------------------------------------------------------------- handlers

    def _on_gossip(self, now: float, msg: Gossip, out: list[Out]) -> None:
        pass  # updates were applied in handle()

    def _on_sync(self, now: float, msg: Sync, out: list[Out]) -> None:
        if msg.view_hash != self.view.hash:
            rows = antientropy.digest(self.view, self.rng)
            out.append((msg.sender_addr, Digest(self.name, self.addr, self.view.hash, rows)))

    def _on_digest(self, now: float, msg: Digest, out: list[Out]) -> None:
        if msg.view_hash == self.view.hash:
            return
        send, want = antientropy.compare(self.view, msg.rows, self.rng)
        if send or want:
            out.append((msg.sender_addr, Delta(self.name, self.addr, send, want)))

    def _on_delta(self, now: float, msg: Delta, out: list[Out]) -> None:
        for entry in msg.updates:
            self._apply(now, entry, gossip=False)
        wanted = antientropy.wanted(self.view, msg.wanted, self.rng)
        if wanted:
            out.append((msg.sender_addr, Delta(self.name, self.addr, wanted, ())))

    def _on_push(self, now: float, msg: PushState, out: list[Out]) -> None:
        for entry in msg.updates:
            self._apply(now, entry, gossip=entry.name == msg.sender)
        if msg.reply:
            state = antientropy.full_state(self.view, self.rng)
            out.append((msg.sender_addr, PushState(self.name, self.addr, state, False)))

    # ------------------------------------------------------------------ timers

    def _suspicion_tick(self, now: float) -> None:
        for name, incarnation in self.suspicions.expire(now):
            entry = self.view.get(name)
            if entry is not None and entry.state == SUSPECT and entry.incarnation == incarnation:
                self._install(now, Entry(name, entry.addr, entry.incarnation, DEAD), rumor=True)

    def _first_ask(self, update: MetaUpdate) -> bool:
        """Ask once per incarnation: the same change arrives from several members."""
        if self.asked.get(update.name, -1) >= update.incarnation:
            return False
        if len(self.asked) >= self.config.max_members:
            self.asked.clear()  # names a member invented need not be remembered forever
        self.asked[update.name] = update.incarnation
        return True

    def _ask_whole_entries(self, msg: MemberMessage, names: list[str], out: list[Out]) -> None:
        """Metadata changes we hold no base for: ask their sender for the whole entries."""
        addr = msg.sender_addr
        if addr is None:
            known = self.view.entries.get(msg.sender)
            addr = known.addr if known is not None else None
        if addr is not None:
            out.append((addr, Delta(self.name, self.addr, (), tuple(names))))

    @staticmethod
    def _meta_update(previous: Entry, entry: Entry) -> Entry | MetaUpdate:
        """How to gossip our new `entry`: as its metadata change from `previous` when
        that is smaller than the whole entry."""
        if previous.state != ALIVE or previous.addr != entry.addr:
            return entry
        changes = meta_changes(previous.meta, entry.meta)
        if changes is None:
            return entry
        update = MetaUpdate(entry.name, entry.incarnation, previous.incarnation, changes)
        return update if entry_size(update) < entry_size(entry) else entry

    def _gossip_tick(self, now: float, out: list[Out]) -> None:
        if now < self.next_gossip_at:
            return
        self.next_gossip_at = now + self.config.gossip_interval_s
        if not self.rumors:
            return
        for target in self.view.sample(self.rng, self.config.gossip_fanout, states=(ALIVE, SUSPECT)):
            if not self.rumors:
                break
            out.append((self.view.entries[target].addr, Gossip(self.name, self.rumors.take(meta_updates=True))))

    def _push_rumors(self, out: list[Out], count: int) -> None:
        """Send pending rumors to `count` random members now, outside the gossip tick."""
        for target in self.view.sample(self.rng, count, states=(ALIVE, SUSPECT)):
            out.append((self.view.entries[target].addr, Gossip(self.name, self.rumors.take(meta_updates=True))))

    def _sync_tick(self, now: float, out: list[Out]) -> None:
        c = self.config
        if now < self.next_sync_at:
            return
        self.next_sync_at = now + c.sync_interval_s * self.rng.uniform(0.75, 1.25)
        for name in self.view.expired_tombstones(now, c.tombstone_ttl_s):
            self._remove(now, name)
        target = antientropy.sync_target(self.view, self.rng, c.reconnect_probability)
        if target is None:
            return
        if self.view.entries[target].state == ALIVE:
            self.prober.sync_due = True  # rides on the next probe (to a random member too)
        else:
            out.append((self.view.entries[target].addr, Sync(self.name, self.addr, self.view.hash)))

    def _join_tick(self, now: float, out: list[Out]) -> None:
        if not self.seeds or now < self.next_join_at:
            return
        if self.joined and self.view.alive_count > 1:
            self.join_backoff_s = self.config.join_retry_s
            return
        self.next_join_at = now + self.join_backoff_s
        self.join_backoff_s = min(self.join_backoff_s * 2, self.config.join_retry_max_s)
        for seed in self.seeds:
            out.append((seed, PushState(self.name, self.addr, (self._own_entry(),), True)))

    # ------------------------------------------------------------- state merge

    def _apply(self, now: float, entry: Entry | MetaUpdate, gossip: bool) -> bool:
        """Merge one update; False only for a metadata change we hold no base for (and
        that is news to us), whose whole entry the caller asks for."""
        if type(entry) is MetaUpdate:
            return self._apply_meta_update(now, entry, gossip)
        if entry.name == self.name:
            self._apply_own(now, entry)
            return True
        self._merge(now, entry, gossip)
        return True

    def _apply_meta_update(self, now: float, update: MetaUpdate, gossip: bool) -> bool:
        current = self.view.entries.get(update.name)
        if update.name == self.name:
            # only its incarnation can be news: a claim that we run a newer one
            self._apply_own(now, Entry(update.name, self.addr, update.incarnation, ALIVE, self.meta))
            return True
        if current is not None and (current.incarnation, current.state) >= (update.incarnation, ALIVE):
            return True  # nothing new
        entry = update.resolve(self._meta_base(current))
        if entry is None:
            if not self.claims.credible(update.incarnation, None if current is None else current.incarnation):
                return True  # an incredible claim is not worth asking about
            self.dropped["meta update without base"] += 1
            return False
        try:
            validate_meta(entry.meta)
        except Invalid:
            self.dropped["meta update too large"] += 1
            return True
        self._merge(now, entry, gossip, rumor_form=update)
        return True

    def _meta_base(self, current: Entry | None) -> Entry | None:
        """The alive entry a MetaUpdate about `current`'s member may build on."""
        if current is not None and current.state == SUSPECT:
            incarnation, meta = self.suspect_meta.get(current.name, (None, None))
            if incarnation == current.incarnation:
                return Entry(current.name, current.addr, incarnation, ALIVE, meta)
        return current

    def _merge(self, now: float, entry: Entry, gossip: bool, rumor_form: MetaUpdate | None = None) -> None:
        current = self.view.entries.get(entry.name)
        full = len(self.view.entries) >= self.config.max_members
        if current is None and (entry.state != ALIVE or full):
            return  # no news about members we never knew (or whose tombstone expired)
        known = None if current is None else current.incarnation
        if not self.claims.credible(entry.incarnation, known):
            return
        if current is not None and entry.addr != current.addr and current.state in (ALIVE, SUSPECT):
            if entry.state != ALIVE:
                entry = replace(entry, addr=current.addr)  # a state claim does not move a member
            elif entry.supersedes(current):
                self.claims.conflict(entry, current)
                return
        if not entry.supersedes(current):
            if (
                entry.state == SUSPECT
                and current.state == SUSPECT
                and entry.incarnation == current.incarnation
                and entry.accuser is not None
                and self.suspicions.confirm(entry.name, entry.accuser)
                and gossip
            ):
                self._queue_rumor(entry)
            return
        if rumor_form is not None:
            self._install(now, entry, rumor=False)
            if gossip:
                self._queue_rumor(rumor_form)
            return
        if not gossip and current is not None and entry.state == ALIVE:
            # news from anti-entropy, passed on: while the same change is still gossiped
            # as a MetaUpdate, a whole entry would spread it a second time, at full size
            self._install(now, entry, rumor=False)
            self._queue_rumor(self._meta_update(self._meta_base(current), entry))
            return
        self._install(now, entry, rumor=gossip or current is not None)

    def _apply_own(self, now: float, claim: Entry) -> None:
        """A claim about ourselves: refute anything newer than our own entry. The first
        claim we hear may be the mesh's record of an earlier process under our name (a
        restart), whatever its incarnation; later ones must be credible."""
        first, self.heard_of_self = not self.heard_of_self, True
        own = self.view.entries[self.name]
        if not claim.supersedes(own):
            return
        if claim.addr != self.addr and claim.state == ALIVE:
            self.claims.conflict(claim, own)
        if self.claims.credible(claim.incarnation, None if first else self.incarnation):
            self._refute(now, claim)

    def _bump_incarnation(self, above: int) -> None:
        # never past what receivers accept (unreachable in practice, see mesh/claims.py)
        self.incarnation = min(max(self.incarnation, above) + 1, MAX_INCARNATION)

    def _refute(self, now: float, claim: Entry) -> None:
        previous = self.view.entries[self.name]
        self._bump_incarnation(claim.incarnation)
        if claim.state != ALIVE:
            self.awareness.adjust(1)
        entry = self._own_entry()
        self._install(now, entry, rumor=False)
        if claim.state == SUSPECT and claim.incarnation == previous.incarnation:
            # members that took the suspicion kept our metadata aside: an empty change does
            self._queue_rumor(self._meta_update(previous, entry))
        else:
            self._queue_rumor(entry)

    def _accuse(self, now: float, name: str) -> None:
        entry = self.view.get(name)
        if entry is None:
            return
        if entry.state == ALIVE:
            accusation = Entry(name, entry.addr, entry.incarnation, SUSPECT, accuser=self.name)
            self._install(now, accusation, rumor=True)
        elif entry.state == SUSPECT and self.suspicions.confirm(name, self.name):
            self._queue_rumor(Entry(name, entry.addr, entry.incarnation, SUSPECT, accuser=self.name))

    def _install(self, now: float, entry: Entry, rumor: bool) -> None:
        name = entry.name
        old = self.view.install(now, entry)
        if old is None and name != self.name:
            self.prober.member_added(name)
        if entry.state == SUSPECT and old is not None and old.state == ALIVE and old.incarnation == entry.incarnation:
            self.suspect_meta[name] = (old.incarnation, old.meta)
        elif entry.state != SUSPECT:
            self.suspect_meta.pop(name, None)
        if entry.state == SUSPECT:
            self.suspicions.start(now, entry, suspicion_bounds(self.config, self.view.alive_count))
            if entry.accuser != self.name and (old is None or old.state != SUSPECT):
                # probe the suspect next: a real failure then gathers independent
                # confirmations within about one probe interval
                self.prober.probe_next(name)
        else:
            self.suspicions.pop(name, None)
        if rumor:
            self._queue_rumor(entry)

    def _remove(self, now: float, name: str) -> None:
        self.view.remove(now, name)
        self.rumors.pop(name, None)
        self.asked.pop(name, None)
        self.suspect_meta.pop(name, None)
        self.suspicions.pop(name, None)

    def _queue_rumor(self, entry: Entry | MetaUpdate) -> None:
        self.rumors.add(entry, len(self.view.entries))

    def _own_entry(self) -> Entry:
        return Entry(self.name, self.addr, self.incarnation, ALIVE, self.meta)



_PIGGYBACKED = (Ping, Ack, Gossip)  # the messages whose updates handle() applies
