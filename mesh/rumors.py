"""The rumor queue: entry updates waiting to be piggybacked on outgoing messages.

Each rumor is sent retransmit_mult*ceil(log10(N+1)) times (N members known when it was
queued), least-sent first, as many per message as fit in `piggyback_bytes`; a newer
rumor about the same member replaces the older one (memberlist's TransmitLimitedQueue).
Metadata changes (MetaUpdate) travel on gossip messages only: a ping or an ack stays
readable by an agent of the previous protocol, which knows no MetaUpdate.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

from .codec import MAX_PIGGYBACK_ENTRIES, entry_size
from .entries import Entry, MetaUpdate


@dataclass(slots=True)
class Rumor:
    entry: Entry | MetaUpdate
    remaining: int
    size: int


class RumorQueue(dict[str, Rumor]):
    """The pending rumors by member name (a dict, so that the protocol's frequent "is
    anything pending?" stays as cheap as it is for a dict)."""

    def __init__(self, retransmit_mult: int, piggyback_bytes: int) -> None:
        super().__init__()
        self.retransmit_mult = retransmit_mult
        self.piggyback_bytes = piggyback_bytes

    def add(self, entry: Entry | MetaUpdate, members: int) -> None:
        """Queue `entry`, replacing any rumor about the same member; `members`: how many
        members the view holds (it sets the number of retransmissions)."""
        n = max(members, 1)
        limit = self.retransmit_mult * math.ceil(math.log10(n + 1))
        self[entry.name] = Rumor(entry, limit, entry_size(entry) + 1)

    def take(self, first: list[Entry] | tuple = (), meta_updates: bool = False) -> tuple[Entry | MetaUpdate, ...]:
        """`first`, then the least-sent rumors that fit in one message (MetaUpdates only
        when `meta_updates`); each rumor taken counts as one transmission."""
        budget = self.piggyback_bytes
        chosen = list(first)
        if not self:
            return tuple(chosen)
        # least-sent first; at most MAX_PIGGYBACK_ENTRIES can fit anyway
        candidates = heapq.nlargest(MAX_PIGGYBACK_ENTRIES, self.items(), key=lambda kv: kv[1].remaining)
        for name, rumor in candidates:
            if not meta_updates and type(rumor.entry) is MetaUpdate:
                continue
            if len(chosen) >= MAX_PIGGYBACK_ENTRIES or rumor.size > budget:
                break
            budget -= rumor.size
            chosen.append(rumor.entry)
            rumor.remaining -= 1
            if rumor.remaining <= 0:
                del self[name]
        return tuple(chosen)
