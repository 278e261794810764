"""SWIM + Lifeguard membership as a pure state machine.

Inputs are `handle(now, msg)` (a typed message from mesh/messages.py, already
validated by the codec) and `tick(now)`; both return the messages to send as
(addr, message) pairs, which the codec encodes. The core never
reads a clock, sleeps or touches a socket; randomness comes from the injected
`random.Random`, so the simulator can run it deterministically in virtual time.

Mechanisms (see DESIGN.md §2):
- randomized round-robin probing (newcomers join the round at a random place),
  k indirect probes plus a second direct ping, nacks from helpers;
- a member hearing of a new suspicion probes the suspect next, so a real failure
  collects independent confirmations quickly while a healthy suspect just answers;
- suspicion with a timeout that starts at max and shrinks towards min as up to k
  independent accusers confirm it (Lifeguard, mesh/suspicion.py), refutation by
  incarnation bump;
- local health multiplier: a member that misses acks/nacks itself probes more
  slowly and waits longer instead of accusing others (Lifeguard);
- updates piggybacked on pings/acks and gossiped to `gossip_fanout` members every
  `gossip_interval` while any are pending, each sent retransmit_mult*ceil(log10(N+1))
  times; nothing is gossiped when nothing changed;
- anti-entropy every `sync_interval`: exchange one 64-bit view hash, and only on a
  mismatch a digest and then the differing entries;
- join by pushing our entry to seeds, graceful leave (`left`), tombstones expire;
- claims from the network are untrusted: incredible incarnation jumps and address
  changes of live members are refused and counted in `dropped` (mesh/claims.py).
"""

from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass, replace

from .claims import ClaimFilter
from .codec import (
    MAX_INCARNATION,
    MAX_MESSAGE_BYTES,
    MAX_PIGGYBACK_ENTRIES,
    entry_size,
    entry_wire,
    fit,
    validate_meta,
)
from .members import ALIVE, DEAD, LEFT, SUSPECT, Entry, entry_digest
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
from .suspicion import Suspicion, suspicion_bounds

Out = tuple[str, MemberMessage]

# budget for the entries or digest rows of one message; the rest of it fits in the remainder
STATE_BUDGET = MAX_MESSAGE_BYTES - 16 * 1024


@dataclass
class ProtocolConfig:
    """Timings in seconds. Defaults were tuned with tests/bench/bench_mesh.py (N=100, 5% loss):
    probing every 0.7 s keeps steady traffic well under 500 B/s per member while a crashed
    member is first probed within ~4.6 intervals at p99; suspicion lasts
    suspicion_mult*log10(N)*probe_interval (2.8 s at N=100) once `suspicion_confirmations`
    independent accusers agree, and up to suspicion_max_mult times that when unconfirmed.
    """

    probe_interval: float = 0.7
    probe_timeout: float = 0.2
    indirect_checks: int = 3
    gossip_interval: float = 0.2
    gossip_fanout: int = 3
    retransmit_mult: int = 4
    sync_interval: float = 2.0
    suspicion_mult: float = 2.0
    suspicion_max_mult: float = 6.0
    suspicion_confirmations: int = 2
    lifeguard: bool = True
    awareness_max: int = 8
    tombstone_ttl: float = 60.0
    join_retry: float = 0.5
    join_retry_max: float = 5.0
    reconnect_probability: float = 0.1
    piggyback_bytes: int = 1200
    rtt_smoothing: float = 0.25
    max_members: int = 10000


class IndexedSet:
    """A set with O(1) add/remove and O(1) access by position (for random sampling)."""

    __slots__ = ("items", "index")

    def __init__(self) -> None:
        self.items: list[str] = []
        self.index: dict[str, int] = {}

    def add(self, item: str) -> None:
        if item not in self.index:
            self.index[item] = len(self.items)
            self.items.append(item)

    def discard(self, item: str) -> None:
        position = self.index.pop(item, None)
        if position is None:
            return
        last = self.items.pop()
        if position < len(self.items):
            self.items[position] = last
            self.index[last] = position

    def __len__(self) -> int:
        return len(self.items)


@dataclass(slots=True)
class LocalInfo:
    since: float
    last_heard: float | None = None
    rtt: float | None = None


@dataclass(slots=True)
class Rumor:
    entry: Entry
    remaining: int
    size: int


@dataclass(slots=True)
class Probe:
    target: str
    seq: int
    start: float
    timeout_at: float
    end_at: float
    indirect_sent: bool = False
    expected_nacks: int = 0
    nacks: int = 0


@dataclass(slots=True)
class HelpRequest:
    requester_addr: str
    requester_seq: int
    nack_at: float


class MeshCore:
    def __init__(
        self,
        name: str,
        addr: str,
        now: float,
        rng: random.Random,
        meta: dict | None = None,
        seeds: list[str] | None = None,
        config: ProtocolConfig | None = None,
    ) -> None:
        self.name = name
        self.addr = addr
        self.rng = rng
        self.config = config or ProtocolConfig()
        self.incarnation = 0
        self.heard_of_self = False  # has any claim about us arrived yet (see _apply_own)
        self.meta = validate_meta(dict(meta or {}))
        self.leaving = False
        self.last_advertise_push = -math.inf
        self.joined = False
        self.seeds: list[str] = []
        self.view: dict[str, Entry] = {}
        self.local: dict[str, LocalInfo] = {}
        self.view_hash = 0
        self.version = 0  # bumped on every view change; lets readers cache snapshots
        self.rumors: dict[str, Rumor] = {}
        self.suspicions: dict[str, Suspicion] = {}
        self.helping: dict[int, HelpRequest] = {}
        self.probe: Probe | None = None
        self.probe_order: list[str] = []
        self.awareness = 0
        self.seq = rng.randrange(1 << 24)
        self.events: list[tuple[float, str, int | None, int | None, int]] = []
        self.alive_count = 0
        self.by_state = [IndexedSet() for _ in range(4)]  # other members' names per state
        self.claims = ClaimFilter(name)
        self.dropped = self.claims.dropped  # refused claims by reason
        c = self.config
        self.next_probe_at = now + rng.uniform(0, c.probe_interval)
        self.next_gossip_at = now
        self.next_sync_at = now + rng.uniform(0.5, 1.0) * c.sync_interval
        self.next_join_at = now
        self.join_backoff = c.join_retry
        self._install(now, Entry(name, addr, 0, ALIVE, self.meta), rumor=True)
        self.set_seeds(seeds or [])

    # ------------------------------------------------------------------ inputs

    def set_seeds(self, seeds: list[str]) -> None:
        self.seeds = [s for s in dict.fromkeys(seeds) if s != self.addr]

    def tick(self, now: float) -> list[Out]:
        out: list[Out] = []
        if self.leaving:
            self._gossip_tick(now, out)
            return out
        self._probe_tick(now, out)
        self._help_tick(now, out)
        self._suspicion_tick(now)
        self._gossip_tick(now, out)
        self._sync_tick(now, out)
        self._join_tick(now, out)
        return out

    def next_deadline(self) -> float:
        times = [self.next_gossip_at if self.rumors else math.inf]
        if not self.leaving:
            times += [self.next_probe_at, self.next_sync_at]
            if self.seeds and (not self.joined or self.alive_count <= 1):
                times.append(self.next_join_at)
            if self.probe is not None:
                times.append(self.probe.end_at)
                if not self.probe.indirect_sent:
                    times.append(self.probe.timeout_at)
            times += [h.nack_at for h in self.helping.values()]
            times += [s.deadline for s in self.suspicions.values()]
        return min(times)

    def handle(self, now: float, msg: MemberMessage) -> list[Out]:
        out: list[Out] = []
        handler = _HANDLERS.get(type(msg))
        if handler is None or self.leaving or msg.sender == self.name:
            return out
        info = self.local.get(msg.sender)
        if info is not None:
            info.last_heard = now
        self.joined = True
        if type(msg) in _PIGGYBACKED:
            for entry in msg.updates:
                self._apply(now, entry, gossip=True)
        handler(self, now, msg, out)
        return out

    def advertise(self, now: float, meta: dict) -> list[Out]:
        """Replace our metadata; spread it with a higher incarnation, to a few members at
        once (a starting instance waits on these updates), at most once per gossip
        interval; later ticks carry it on."""
        self.meta = validate_meta(dict(meta))
        self._bump_incarnation(self.incarnation)
        self._install(now, self._own_entry(), rumor=True)
        out: list[Out] = []
        if now - self.last_advertise_push >= self.config.gossip_interval:
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

    def _push_rumors(self, out: list[Out], count: int) -> None:
        """Send pending rumors to `count` random members now, outside the gossip tick."""
        for target in self._random_members(count, states=(ALIVE, SUSPECT)):
            self._send(out, self.view[target].addr, Gossip(self.name, self._piggyback()))

    def drain_events(self) -> list[tuple[float, str, int | None, int | None, int]]:
        events, self.events = self.events, []
        return events

    def members(self) -> list[tuple[Entry, LocalInfo]]:
        return [(e, self.local[n]) for n, e in self.view.items()]

    # ---------------------------------------------------------------- handlers

    def _on_ping(self, now: float, msg: Ping, out: list[Out]) -> None:
        if msg.target == self.name:
            self._send(out, msg.sender_addr, Ack(self.name, msg.seq, self._piggyback()))

    def _on_ack(self, now: float, msg: Ack, out: list[Out]) -> None:
        seq = msg.seq
        probe = self.probe
        if probe is not None and seq == probe.seq:
            target = self.view.get(probe.target)
            if msg.sender == probe.target and target is not None and not probe.indirect_sent:
                info = self.local[probe.target]
                sample = max(0.0, now - probe.start)
                a = self.config.rtt_smoothing
                info.rtt = sample if info.rtt is None else (1 - a) * info.rtt + a * sample
            self.probe = None
            self._adjust_awareness(-1)
            return
        help_req = self.helping.pop(seq, None)
        if help_req is not None:
            self._send(out, help_req.requester_addr, Ack(self.name, help_req.requester_seq))

    def _on_nack(self, now: float, msg: Nack, out: list[Out]) -> None:
        if self.probe is not None and msg.seq == self.probe.seq:
            self.probe.nacks += 1

    def _on_ping_req(self, now: float, msg: PingReq, out: list[Out]) -> None:
        if len(self.helping) >= 256:
            return
        seq = self._next_seq()
        self.helping[seq] = HelpRequest(msg.sender_addr, msg.seq, now + 0.8 * self.config.probe_timeout)
        self._send(out, msg.target_addr, Ping(self.name, self.addr, seq, msg.target))

    def _on_gossip(self, now: float, msg: Gossip, out: list[Out]) -> None:
        pass  # updates were applied in handle()

    def _on_sync(self, now: float, msg: Sync, out: list[Out]) -> None:
        if msg.view_hash != self.view_hash:
            digest = [(n, e.incarnation, e.state) for n, e in self.view.items()]
            digest = fit(self.rng, digest, STATE_BUDGET)
            self._send(out, msg.sender_addr, Digest(self.name, self.addr, self.view_hash, tuple(digest)))

    def _on_digest(self, now: float, msg: Digest, out: list[Out]) -> None:
        if msg.view_hash == self.view_hash:
            return
        theirs = set()
        send: list[Entry] = []
        want: list[str] = []
        for name, inc, state in msg.rows:
            theirs.add(name)
            mine = self.view.get(name)
            if mine is None:
                if state == ALIVE:
                    want.append(name)
            elif (inc, state) > (mine.incarnation, mine.state):
                want.append(name)
            elif (inc, state) < (mine.incarnation, mine.state):
                send.append(mine)
        send += [e for n, e in self.view.items() if n not in theirs]
        want = fit(self.rng, want, STATE_BUDGET // 2)
        send = fit(self.rng, send, STATE_BUDGET // 2, entry_wire)
        if send or want:
            self._send(out, msg.sender_addr, Delta(self.name, self.addr, tuple(send), tuple(want)))

    def _on_delta(self, now: float, msg: Delta, out: list[Out]) -> None:
        for entry in msg.updates:
            self._apply(now, entry, gossip=False)
        wanted = [self.view[n] for n in msg.wanted if n in self.view]
        wanted = fit(self.rng, wanted, STATE_BUDGET, entry_wire)
        if wanted:
            self._send(out, msg.sender_addr, Delta(self.name, self.addr, tuple(wanted), ()))

    def _on_push(self, now: float, msg: PushState, out: list[Out]) -> None:
        for entry in msg.updates:
            self._apply(now, entry, gossip=entry.name == msg.sender)
        if msg.reply:
            full_state = fit(self.rng, list(self.view.values()), STATE_BUDGET, entry_wire)
            self._send(out, msg.sender_addr, PushState(self.name, self.addr, tuple(full_state), False))

    # ------------------------------------------------------------------ timers

    def _probe_tick(self, now: float, out: list[Out]) -> None:
        c = self.config
        probe = self.probe
        scale = self.awareness + 1
        if probe is not None and not probe.indirect_sent and now >= probe.timeout_at:
            probe.indirect_sent = True
            target = self.view.get(probe.target)
            if target is not None:
                helpers = self._random_members(
                    c.indirect_checks, states=(ALIVE,), exclude=(probe.target,)
                )
                probe.expected_nacks = len(helpers)
                # a second direct ping, like memberlist's TCP fallback: one lost
                # datagram should not be enough to start a suspicion
                self._send(out, target.addr, Ping(self.name, self.addr, probe.seq, probe.target))
                for helper in helpers:
                    preq = PingReq(self.name, self.addr, probe.seq, probe.target, target.addr)
                    self._send(out, self.view[helper].addr, preq)
        if probe is not None and now >= probe.end_at:
            self.probe = None
            missed = probe.expected_nacks - probe.nacks if probe.expected_nacks else 1
            self._adjust_awareness(max(missed, 0))
            self._accuse(now, probe.target)
        if now >= self.next_probe_at:
            target = self._next_probe_target()
            if target is None:
                self.next_probe_at = now + c.probe_interval
                return
            seq = self._next_seq()
            self.probe = Probe(
                target=target,
                seq=seq,
                start=now,
                timeout_at=now + c.probe_timeout * scale,
                end_at=now + c.probe_interval * scale,
            )
            self.next_probe_at = now + c.probe_interval * scale
            entry = self.view[target]
            first = [entry] if entry.state == SUSPECT else []  # buddy system
            self._send(out, entry.addr, Ping(self.name, self.addr, seq, target, self._piggyback(first)))

    def _help_tick(self, now: float, out: list[Out]) -> None:
        for seq, req in list(self.helping.items()):
            if now >= req.nack_at:
                del self.helping[seq]
                self._send(out, req.requester_addr, Nack(self.name, req.requester_seq))

    def _suspicion_tick(self, now: float) -> None:
        for name, s in list(self.suspicions.items()):
            if now >= s.deadline:
                del self.suspicions[name]
                entry = self.view.get(name)
                if entry is not None and entry.state == SUSPECT and entry.incarnation == s.incarnation:
                    self._install(now, Entry(name, entry.addr, entry.incarnation, DEAD), rumor=True)

    def _gossip_tick(self, now: float, out: list[Out]) -> None:
        if now < self.next_gossip_at:
            return
        self.next_gossip_at = now + self.config.gossip_interval
        if not self.rumors:
            return
        for target in self._random_members(self.config.gossip_fanout, states=(ALIVE, SUSPECT)):
            if not self.rumors:
                break
            self._send(out, self.view[target].addr, Gossip(self.name, self._piggyback()))

    def _sync_tick(self, now: float, out: list[Out]) -> None:
        c = self.config
        if now < self.next_sync_at:
            return
        self.next_sync_at = now + c.sync_interval * self.rng.uniform(0.75, 1.25)
        self._expire_tombstones(now)
        target = None
        if self.rng.random() < c.reconnect_probability:
            dead = self._random_members(1, states=(DEAD,))
            target = dead[0] if dead else None
        if target is None:
            alive = self._random_members(1, states=(ALIVE,))
            target = alive[0] if alive else None
        if target is not None:
            self._send(out, self.view[target].addr, Sync(self.name, self.addr, self.view_hash))

    def _join_tick(self, now: float, out: list[Out]) -> None:
        if not self.seeds or now < self.next_join_at:
            return
        if self.joined and self.alive_count > 1:
            self.join_backoff = self.config.join_retry
            return
        self.next_join_at = now + self.join_backoff
        self.join_backoff = min(self.join_backoff * 2, self.config.join_retry_max)
        for seed in self.seeds:
            self._send(out, seed, PushState(self.name, self.addr, (self._own_entry(),), True))

    def _expire_tombstones(self, now: float) -> None:
        ttl = self.config.tombstone_ttl
        for name in self.by_state[DEAD].items + self.by_state[LEFT].items:
            if now - self.local[name].since >= ttl:
                self._remove(now, name)

    # ------------------------------------------------------------- state merge

    def _apply(self, now: float, entry: Entry, gossip: bool) -> None:
        if entry.name == self.name:
            self._apply_own(now, entry)
            return
        current = self.view.get(entry.name)
        if current is None and (entry.state != ALIVE or len(self.view) >= self.config.max_members):
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
                and self._confirm(now, entry.name, entry.accuser)
                and gossip
            ):
                self._queue_rumor(entry)
            return
        rumor = gossip or current is not None
        self._install(now, entry, rumor=rumor)

    def _apply_own(self, now: float, claim: Entry) -> None:
        """A claim about ourselves: refute anything newer than our own entry. The first
        claim we hear may be the mesh's record of an earlier process under our name (a
        restart), whatever its incarnation; later ones must be credible."""
        first, self.heard_of_self = not self.heard_of_self, True
        if not claim.supersedes(self.view[self.name]):
            return
        if claim.addr != self.addr and claim.state == ALIVE:
            self.claims.conflict(claim, self.view[self.name])
        if self.claims.credible(claim.incarnation, None if first else self.incarnation):
            self._refute(now, claim)

    def _bump_incarnation(self, above: int) -> None:
        # never past what receivers accept (unreachable in practice, see mesh/claims.py)
        self.incarnation = min(max(self.incarnation, above) + 1, MAX_INCARNATION)

    def _refute(self, now: float, claim: Entry) -> None:
        self._bump_incarnation(claim.incarnation)
        if claim.state != ALIVE:
            self._adjust_awareness(1)
        self._install(now, self._own_entry(), rumor=True)

    def _accuse(self, now: float, name: str) -> None:
        entry = self.view.get(name)
        if entry is None:
            return
        if entry.state == ALIVE:
            accusation = Entry(name, entry.addr, entry.incarnation, SUSPECT, accuser=self.name)
            self._install(now, accusation, rumor=True)
        elif entry.state == SUSPECT and self._confirm(now, name, self.name):
            self._queue_rumor(Entry(name, entry.addr, entry.incarnation, SUSPECT, accuser=self.name))

    def _install(self, now: float, entry: Entry, rumor: bool) -> None:
        name = entry.name
        old = self.view.get(name)
        if old is not None:
            self.view_hash ^= entry_digest(name, old.incarnation, old.state)
            if old.state == ALIVE:
                self.alive_count -= 1
        self.view_hash ^= entry_digest(name, entry.incarnation, entry.state)
        if entry.state == ALIVE:
            self.alive_count += 1
        self.view[name] = entry
        self.version += 1
        if name != self.name:
            if old is not None:
                self.by_state[old.state].discard(name)
            self.by_state[entry.state].add(name)
        info = self.local.get(name)
        if info is None:
            self.local[name] = LocalInfo(since=now)
        elif old is None or old.state != entry.state:
            info.since = now
        if old is None or old.state != entry.state:
            self.events.append((now, name, None if old is None else old.state, entry.state, entry.incarnation))
        if old is None and name != self.name:
            # a newcomer joins the current probe round at a random position
            self.probe_order.insert(self.rng.randint(0, len(self.probe_order)), name)
        if entry.state == SUSPECT:
            self._start_suspicion(now, entry)
            if entry.accuser != self.name and (old is None or old.state != SUSPECT):
                # probe the suspect next: a real failure then gathers independent
                # confirmations within about one probe interval
                self.probe_order.append(name)
        else:
            self.suspicions.pop(name, None)
        if rumor:
            self._queue_rumor(entry)

    def _remove(self, now: float, name: str) -> None:
        old = self.view.pop(name)
        self.local.pop(name, None)
        self.view_hash ^= entry_digest(name, old.incarnation, old.state)
        if old.state == ALIVE:
            self.alive_count -= 1
        self.rumors.pop(name, None)
        self.suspicions.pop(name, None)
        self.by_state[old.state].discard(name)
        self.version += 1
        self.events.append((now, name, old.state, None, old.incarnation))

    # -------------------------------------------------------------- suspicion

    def _suspicion_bounds(self) -> tuple[float, float, int]:
        return suspicion_bounds(self.config, self.alive_count)

    def _start_suspicion(self, now: float, entry: Entry) -> None:
        existing = self.suspicions.get(entry.name)
        if existing is not None and existing.incarnation == entry.incarnation:
            if entry.accuser is not None:
                existing.confirm(entry.accuser)
            return
        accusers = {entry.accuser} if entry.accuser is not None else set()
        low, high, k = self._suspicion_bounds()
        self.suspicions[entry.name] = Suspicion(entry.incarnation, now, low, high, k, accusers)

    def _confirm(self, now: float, name: str, accuser: str) -> bool:
        """True when this was a new confirmation, counted (at most k are): worth re-gossiping."""
        s = self.suspicions.get(name)
        return s is not None and s.confirm(accuser)

    # -------------------------------------------------------------- messaging

    def _queue_rumor(self, entry: Entry) -> None:
        n = max(len(self.view), 1)
        limit = self.config.retransmit_mult * math.ceil(math.log10(n + 1))
        self.rumors[entry.name] = Rumor(entry, limit, entry_size(entry) + 1)

    def _piggyback(self, first: list[Entry] = ()) -> tuple[Entry, ...]:
        budget = self.config.piggyback_bytes
        chosen = list(first)
        if not self.rumors:
            return tuple(chosen)
        # least-sent first; at most MAX_PIGGYBACK_ENTRIES can fit anyway
        candidates = heapq.nlargest(
            MAX_PIGGYBACK_ENTRIES, self.rumors.items(), key=lambda kv: kv[1].remaining
        )
        for name, rumor in candidates:
            if len(chosen) >= MAX_PIGGYBACK_ENTRIES or rumor.size > budget:
                break
            budget -= rumor.size
            chosen.append(rumor.entry)
            rumor.remaining -= 1
            if rumor.remaining <= 0:
                del self.rumors[name]
        return tuple(chosen)

    def _send(self, out: list[Out], addr: str, msg: MemberMessage) -> None:
        out.append((addr, msg))

    def _next_seq(self) -> int:
        self.seq = (self.seq + 1) % (1 << 24)  # only a few probes are ever outstanding
        return self.seq

    def _own_entry(self) -> Entry:
        return Entry(self.name, self.addr, self.incarnation, ALIVE, self.meta)

    def _adjust_awareness(self, delta: int) -> None:
        if self.config.lifeguard:
            self.awareness = min(max(self.awareness + delta, 0), self.config.awareness_max - 1)

    def _random_members(self, count: int, states: tuple, exclude: tuple = ()) -> list[str]:
        """Up to `count` distinct random other members in `states`, none in `exclude`."""
        pools = [self.by_state[state].items for state in states]
        total = sum(len(pool) for pool in pools)
        picked: list[str] = []
        for index in self.rng.sample(range(total), min(total, count + len(exclude))):
            for pool in pools:
                if index < len(pool):
                    name = pool[index]
                    break
                index -= len(pool)
            if name not in exclude:
                picked.append(name)
                if len(picked) == count:
                    break
        return picked

    def _next_probe_target(self) -> str | None:
        for _ in range(2):
            while self.probe_order:
                name = self.probe_order.pop()
                entry = self.view.get(name)
                if entry is not None and entry.state in (ALIVE, SUSPECT):
                    return name
            self.probe_order = [
                n for n, e in self.view.items() if n != self.name and e.state in (ALIVE, SUSPECT)
            ]
            self.rng.shuffle(self.probe_order)
        return None


_HANDLERS = {
    Ping: MeshCore._on_ping,
    Ack: MeshCore._on_ack,
    Nack: MeshCore._on_nack,
    PingReq: MeshCore._on_ping_req,
    Gossip: MeshCore._on_gossip,
    Sync: MeshCore._on_sync,
    Digest: MeshCore._on_digest,
    Delta: MeshCore._on_delta,
    PushState: MeshCore._on_push,
}
_PIGGYBACKED = (Ping, Ack, Gossip)  # the messages whose updates handle() applies
