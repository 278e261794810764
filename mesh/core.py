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
  (mesh/rumors.py);
- anti-entropy every `sync_interval_s`: one 64-bit view hash, and only on a mismatch a
  digest and then the differing entries (mesh/antientropy.py);
- join by pushing our entry to seeds, graceful leave (`left`), tombstones expire;
- claims from the network are untrusted: incredible incarnation jumps and address
  changes of live members are refused and counted in `dropped` (mesh/claims.py).
"""

from __future__ import annotations

import math
import random
from dataclasses import replace

from . import antientropy
from .awareness import Awareness
from .claims import ClaimFilter
from .codec import MAX_INCARNATION, validate_meta
from .config import ProtocolConfig
from .entries import ALIVE, DEAD, LEFT, SUSPECT, Entry
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
            for entry in msg.updates:
                self._apply(now, entry, gossip=True)
        handler(now, msg, out)
        return out

    def advertise(self, now: float, meta: dict) -> list[Out]:
        """Replace our metadata; spread it with a higher incarnation, to a few members at
        once (a starting instance waits on these updates), at most once per gossip
        interval; later ticks carry it on."""
        self.meta = validate_meta(dict(meta))
        self._bump_incarnation(self.incarnation)
        self._install(now, self._own_entry(), rumor=True)
        out: list[Out] = []
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

    def _gossip_tick(self, now: float, out: list[Out]) -> None:
        if now < self.next_gossip_at:
            return
        self.next_gossip_at = now + self.config.gossip_interval_s
        if not self.rumors:
            return
        for target in self.view.sample(self.rng, self.config.gossip_fanout, states=(ALIVE, SUSPECT)):
            if not self.rumors:
                break
            out.append((self.view.entries[target].addr, Gossip(self.name, self.rumors.take())))

    def _push_rumors(self, out: list[Out], count: int) -> None:
        """Send pending rumors to `count` random members now, outside the gossip tick."""
        for target in self.view.sample(self.rng, count, states=(ALIVE, SUSPECT)):
            out.append((self.view.entries[target].addr, Gossip(self.name, self.rumors.take())))

    def _sync_tick(self, now: float, out: list[Out]) -> None:
        c = self.config
        if now < self.next_sync_at:
            return
        self.next_sync_at = now + c.sync_interval_s * self.rng.uniform(0.75, 1.25)
        for name in self.view.expired_tombstones(now, c.tombstone_ttl_s):
            self._remove(now, name)
        target = antientropy.sync_target(self.view, self.rng, c.reconnect_probability)
        if target is not None:
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

    def _apply(self, now: float, entry: Entry, gossip: bool) -> None:
        if entry.name == self.name:
            self._apply_own(now, entry)
            return
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
        self._bump_incarnation(claim.incarnation)
        if claim.state != ALIVE:
            self.awareness.adjust(1)
        self._install(now, self._own_entry(), rumor=True)

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
        self.suspicions.pop(name, None)

    def _queue_rumor(self, entry: Entry) -> None:
        self.rumors.add(entry, len(self.view.entries))

    def _own_entry(self) -> Entry:
        return Entry(self.name, self.addr, self.incarnation, ALIVE, self.meta)



_PIGGYBACKED = (Ping, Ack, Gossip)  # the messages whose updates handle() applies
