"""Lifeguard suspicion timeouts (DESIGN.md §2), apart from the rest of the core.

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


def suspicion_bounds(config, alive: int) -> tuple[float, float, int]:
    """(minimum timeout, maximum timeout, k) with `alive` members alive.

    The minimum is suspicion_mult*log10(N)*probe_interval; without Lifeguard, or when
    too few members are alive to ever gather k confirmations, it is the only timeout.
    """
    n = max(alive, 1)
    low = config.suspicion_mult * max(1.0, math.log10(n)) * config.probe_interval
    if not config.lifeguard:
        return low, low, 0
    k = config.suspicion_confirmations
    if n - 2 < k:
        k = 0
    return low, config.suspicion_max_mult * low, k


@dataclass(slots=True)
class Suspicion:
    incarnation: int
    start: float
    low: float
    high: float
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
            timeout = self.low
        else:
            frac = math.log(self.confirmations + 1) / math.log(self.k + 1)
            timeout = max(self.low, self.high - (self.high - self.low) * frac)
        self.deadline = self.start + timeout
