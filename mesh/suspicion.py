"""Lifeguard suspicion timeouts, apart from the rest of the core.

A suspicion starts with the maximum timeout and shrinks towards the minimum as
independent members confirm it, reaching the minimum after `k` confirmations. The
first accuser starts it and does not count as a confirmation. Confirmations stop
being counted at k: past that point the timeout cannot shrink any further, and since
each counted confirmation is gossiped again with a full retransmit budget, an uncapped
count would let every new accuser name (forged or not) buy another round of gossip and
grow the accuser set without bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .entries import Entry


def suspicion_bounds(config, alive: int) -> tuple[float, float, int]:
    """(minimum timeout, maximum timeout, k) in seconds with `alive` members alive.

    The minimum is suspicion_mult*log10(N)*probe_interval_s; without Lifeguard, or when
    too few members are alive to ever gather k confirmations, it is the only timeout.
    """
    n = max(alive, 1)
    low_s = config.suspicion_mult * max(1.0, math.log10(n)) * config.probe_interval_s
    if not config.lifeguard:
        return low_s, low_s, 0
    k = config.suspicion_confirmations
    if n - 2 < k:
        k = 0
    return low_s, config.suspicion_max_mult * low_s, k


@dataclass(slots=True)
class Suspicion:
    incarnation: int
    start: float
    low_s: float
    high_s: float
    k: int
    accusers: set[str] = field(default_factory=set)
    deadline: float = 0.0

    def __post_init__(self) -> None:
        self._set_deadline()

    @property
    def confirmations(self) -> int:
        return max(len(self.accusers) - 1, 0)

    def confirm(self, accuser: str) -> bool:
        """Count `accuser`'s confirmation; False (nothing changes) for a repeated
        accuser or once k confirmations were counted."""
        if accuser in self.accusers or len(self.accusers) > self.k:
            return False
        self.accusers.add(accuser)
        self._set_deadline()
        return True

    def _set_deadline(self) -> None:
        if self.k < 1:
            timeout_s = self.low_s
        else:
            frac = math.log(self.confirmations + 1) / math.log(self.k + 1)
            timeout_s = max(self.low_s, self.high_s - (self.high_s - self.low_s) * frac)
        self.deadline = self.start + timeout_s


class Suspicions(dict[str, Suspicion]):
    """The running suspicions by member name, at most one per member."""

    def start(self, now: float, entry: Entry, bounds: tuple[float, float, int]) -> None:
        """A suspect `entry` was installed: start its suspicion, or count its accuser as a
        confirmation of the one running for the same incarnation."""
        existing = self.get(entry.name)
        if existing is not None and existing.incarnation == entry.incarnation:
            if entry.accuser is not None:
                existing.confirm(entry.accuser)
            return
        accusers = {entry.accuser} if entry.accuser is not None else set()
        low_s, high_s, k = bounds
        self[entry.name] = Suspicion(entry.incarnation, now, low_s, high_s, k, accusers)

    def confirm(self, name: str, accuser: str) -> bool:
        """True when this was a new confirmation, counted (at most k are): worth re-gossiping."""
        s = self.get(name)
        return s is not None and s.confirm(accuser)

    def expire(self, now: float) -> list[tuple[str, int]]:
        """(name, incarnation) of every suspicion whose deadline passed, in the order they
        started; they are removed."""
        expired = [(name, s.incarnation) for name, s in self.items() if now >= s.deadline]
        for name, _ in expired:
            del self[name]
        return expired

    def next_deadline(self) -> float:
        return min([s.deadline for s in self.values()], default=math.inf)
