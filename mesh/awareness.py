"""Lifeguard local health: a member that itself misses acks and nacks is probably the
slow or disconnected one, so it probes more slowly and waits longer before accusing
anyone, instead of declaring healthy members suspect."""

from __future__ import annotations


class Awareness:
    """A score in [0, limit - 1]: failed exchanges raise it, successful ones lower it;
    timings are multiplied by score + 1. Without Lifeguard it stays 0."""

    __slots__ = ("score", "limit", "enabled")

    def __init__(self, limit: int, enabled: bool = True) -> None:
        self.score = 0
        self.limit = limit
        self.enabled = enabled

    def adjust(self, delta: int) -> None:
        if self.enabled:
            self.score = min(max(self.score + delta, 0), self.limit - 1)

    @property
    def multiplier(self) -> int:
        return self.score + 1
