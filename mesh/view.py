"""The local view of the mesh: one entry per known member (ourselves included), what we
observed of each locally, and the indexes the protocol needs: a 64-bit hash of the whole
view for anti-entropy, live counts, random sampling by state, and a log of changes."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from .entries import ALIVE, DEAD, LEFT, Entry, entry_digest

# (time, member, old state or None, new state or None, incarnation)
ViewEvent = tuple[float, str, int | None, int | None, int]


@dataclass(slots=True)
class LocalInfo:
    """Observed locally, never gossiped: when the member's state last changed, when a
    message last came from it, and the smoothed round-trip time of direct probes."""

    since: float
    last_heard: float | None = None
    rtt_s: float | None = None


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


class View(Mapping):
    """Member name -> Entry (read-only as a mapping; change it with install/remove)."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.entries: dict[str, Entry] = {}
        self.local: dict[str, LocalInfo] = {}
        self.hash = 0
        self.version = 0  # bumped on every change; lets readers cache snapshots
        self.alive_count = 0
        self.by_state = [IndexedSet() for _ in range(4)]  # other members' names per state
        self.events: list[ViewEvent] = []

    def __getitem__(self, name: str) -> Entry:
        return self.entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def install(self, now: float, entry: Entry) -> Entry | None:
        """Make `entry` the member's entry; returns the one it replaced (None: a newcomer)."""
        name = entry.name
        old = self.entries.get(name)
        if old is not None:
            self.hash ^= entry_digest(name, old.incarnation, old.state)
            if old.state == ALIVE:
                self.alive_count -= 1
        self.hash ^= entry_digest(name, entry.incarnation, entry.state)
        if entry.state == ALIVE:
            self.alive_count += 1
        self.entries[name] = entry
        self.version += 1
        if name != self.owner:
            if old is not None:
                self.by_state[old.state].discard(name)
            self.by_state[entry.state].add(name)
        info = self.local.get(name)
        if info is None:
            self.local[name] = LocalInfo(since=now)
        elif old is None or old.state != entry.state:
            info.since = now
        if old is None or old.state != entry.state:
            old_state = None if old is None else old.state
            self.events.append((now, name, old_state, entry.state, entry.incarnation))
        return old

    def remove(self, now: float, name: str) -> None:
        """Forget a member altogether (its tombstone expired)."""
        old = self.entries.pop(name)
        self.local.pop(name, None)
        self.hash ^= entry_digest(name, old.incarnation, old.state)
        if old.state == ALIVE:
            self.alive_count -= 1
        self.by_state[old.state].discard(name)
        self.version += 1
        self.events.append((now, name, old.state, None, old.incarnation))

    def expired_tombstones(self, now: float, ttl_s: float) -> list[str]:
        """Dead or left members whose state has not changed for `ttl_s`."""
        return [n for n in self.by_state[DEAD].items + self.by_state[LEFT].items
                if now - self.local[n].since >= ttl_s]

    def sample(self, rng, count: int, states: tuple, exclude: tuple = ()) -> list[str]:
        """Up to `count` distinct random other members in `states`, none in `exclude`."""
        pools = [self.by_state[state].items for state in states]
        total = sum(len(pool) for pool in pools)
        picked: list[str] = []
        for index in rng.sample(range(total), min(total, count + len(exclude))):
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

    def drain_events(self) -> list[ViewEvent]:
        events, self.events = self.events, []
        return events
