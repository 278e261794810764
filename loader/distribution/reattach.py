"""When a starting rank tries which mesh upstream, waits, or gives up: a pure function of
the gossip table, the clock and past outcomes (no sockets, no sleeping, no clock reads),
driven by `upstream_choice.fetch_with_reattach`.

- Try the table's usable upstreams, best first (`rank_upstreams`), each only while the
  table still offers it (`offers`: never one that has begun to receive from us), skipping for
  `suspect_s` any that failed for a reason other than busy / not receiving yet (a dead
  hop may linger in the table until gossip declares it dead).
- After rounds in which every upstream said "busy", wait exponentially longer, with
  jitter, before asking them again; otherwise (a relay about to start receiving, an
  empty table) retry soon. Meanwhile re-read the table every `retry_s`: an upstream it
  shows with a free slot (advertised load below capacity) is asked at once, unless it
  refused us since and the table shows it with the same load still (gossip has not
  caught up: ask it with the others once the wait is over). A chain forms one link per new
  relay; every link had waited out a backoff of up to 2 s.
- Take turns with the other newcomers (`waiting`: the endpoints of the members, ourselves
  included, that the table shows attaching for the same weights): the i-th of them, in
  endpoint order, asks only the i-th free slot the table shows (upstreams in rank order,
  each once per free slot), so that a new relay is asked by one newcomer, not by all of
  them at once; a slot still free after `TURN_GRACE_S` (its newcomer is slow, or sees
  another table) is anyone's. While the table shows no free slot at all, newcomers wait
  for it to change (a relay that begins to receive, a downstream that leaves), and ask
  the full upstreams (as above, with backoff) only once it has shown no free slot for
  `BUSY_BACKOFF_CAP_S` (gossip may have lost a slot that came free). Every newcomer being
  served leaves `waiting`, so the turns move on as the table changes; without `waiting`
  (or alone in it) there are no turns.
- Give up after `deadline_s`, or once the table has offered nothing usable for `idle_s`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from loader.distribution.ranking import Upstream, rank_upstreams
from loader.transfer.protocol import is_retryable

BUSY_BACKOFF_CAP_S = 2.0
TURN_GRACE_S = 0.3  # how long a free slot is kept for the newcomer whose turn it is


@dataclass(frozen=True)
class ReattachPolicy:
    deadline_s: float = 300.0
    idle_s: float | None = None  # None: keep waiting until the deadline
    suspect_s: float = 10.0
    retry_s: float = 0.05
    zone: str | None = None


@dataclass(frozen=True)
class Attempt:
    candidates: list[str]


@dataclass(frozen=True)
class Wait:
    seconds: float


@dataclass(frozen=True)
class GiveUp:
    reason: str


def retry_delay_s(
    busy_rounds: int, base_s: float, rng: random.Random, cap_s: float = BUSY_BACKOFF_CAP_S
) -> float:
    """Delay before re-reading the table: exponential in the rounds of "busy" answers
    (jittered, so newcomers refused together do not come back together)."""
    ceiling = min(cap_s, base_s * (2**busy_rounds))
    return ceiling * (0.5 + 0.5 * rng.random())


@dataclass
class Reattach:
    policy: ReattachPolicy
    self_endpoint: str
    started: float
    rng: random.Random
    failures: list[tuple[str, str]] = field(default_factory=list)  # real failures only
    refusals: int = 0  # busy / not receiving yet: expected while a chain forms
    busy_rounds: int = 0
    _suspects: dict[str, float] = field(default_factory=dict)
    _refused_at_load: dict[str, int] = field(default_factory=dict)  # the load shown then
    _last_offer: float | None = None
    _resume_at: float = 0.0
    _free_since: dict[str, float] = field(default_factory=dict)  # slot free in the table since
    _no_room_since: float | None = None

    def next(
        self, now: float, table: list[Upstream], waiting: list[str] = ()
    ) -> Attempt | Wait | GiveUp:
        policy = self.policy
        if now - self.started >= policy.deadline_s:
            return GiveUp(
                f"no upstream served us within {policy.deadline_s:g}s ({self.refusals} busy refusals)"
            )
        last_offer = self.started if self._last_offer is None else self._last_offer
        if policy.idle_s is not None and now - last_offer >= policy.idle_s:
            return GiveUp(f"no usable upstream in the table for {policy.idle_s:g}s")
        rows = {row.endpoint: row for row in table}
        candidates = [
            c
            for c in rank_upstreams(table, self.self_endpoint, policy.zone)
            if self._suspects.get(c, 0.0) <= now
        ]
        if not candidates:
            return Wait(retry_delay_s(0, policy.retry_s, self.rng))
        self._last_offer = now
        turn = self._turn(now, [rows[c] for c in candidates], waiting)
        if turn is not None:
            return turn
        if now >= self._resume_at:
            return Attempt(candidates)
        with_room = [c for c in candidates if self._has_room(rows[c])]
        if with_room:
            return Attempt(with_room)
        return Wait(min(self._resume_at - now, policy.retry_s))

    def _turn(self, now: float, ranked: list[Upstream], waiting) -> Attempt | Wait | None:
        """Our share of the free slots while other newcomers wait too; None: no turns
        (we are not among `waiting` or alone in it)."""
        free = [row for row in ranked if self._has_room(row)]
        shown = {row.endpoint for row in free}
        self._free_since = {e: t for e, t in self._free_since.items() if e in shown}
        for row in free:
            self._free_since.setdefault(row.endpoint, now)
        if free:
            self._no_room_since = None
        elif self._no_room_since is None:
            self._no_room_since = now
        rivals = sorted(set(waiting))
        if self.self_endpoint not in rivals or len(rivals) < 2:
            return None
        if any(row.capacity is None for row in ranked):
            return None  # it takes all comers (or says busy itself): nothing to share
        place = rivals.index(self.self_endpoint)
        if not free:  # the full ones are asked only once the table looks stuck
            if now - self._no_room_since >= BUSY_BACKOFF_CAP_S:
                return None
            return Wait(self.policy.retry_s)
        slots = [row.endpoint for row in free for _ in range(row.capacity - row.load)]
        mine = [slots[place]] if place < len(slots) else []
        unclaimed = [e for e in shown if now - self._free_since[e] >= TURN_GRACE_S]
        asked = [e for e in (row.endpoint for row in free) if e in mine or e in unclaimed]
        if asked:
            return Attempt(asked)
        first_free = min(self._free_since[e] for e in shown)
        return Wait(min(self.policy.retry_s, first_free + TURN_GRACE_S - now))

    def _has_room(self, row: Upstream) -> bool:
        """The table shows a free slot, and no refusal from it contradicts that yet."""
        if row.capacity is None or row.load >= row.capacity:
            self._refused_at_load.pop(row.endpoint, None)  # the table caught up with its answer
            return False
        held = self._refused_at_load.get(row.endpoint)
        if held is not None and held == row.load:
            return False
        self._refused_at_load.pop(row.endpoint, None)
        return True

    def offers(self, candidate: str, table: list[Upstream]) -> bool:
        """Whether `table` still ranks `candidate` as an upstream for us (it may since have
        begun to receive from us)."""
        return candidate in rank_upstreams(table, self.self_endpoint, self.policy.zone)

    def record(
        self, now: float, failures: list[tuple[str, str]], table: list[Upstream] = ()
    ) -> None:
        """The failures of an attempt that did not succeed (`table`: as read before it)."""
        loads = {row.endpoint: row.load for row in table}
        for source, reason in failures:
            if source in loads:
                self._refused_at_load[source] = loads[source]
            if is_retryable(reason):
                self.refusals += 1
            else:
                self._suspects[source] = now + self.policy.suspect_s
                self.failures.append((source, reason))
        all_busy = bool(failures) and all(reason.startswith("busy:") for _, reason in failures)
        self.busy_rounds = self.busy_rounds + 1 if all_busy else 0
        self._last_offer = now
        self._resume_at = now + retry_delay_s(self.busy_rounds, self.policy.retry_s, self.rng)
