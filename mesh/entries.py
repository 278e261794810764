"""Member entries as gossiped, and the precedence rule that merges them.

An entry is (name, addr, incarnation, state, meta). Of two entries about the same
name the one with the larger (incarnation, state rank) wins; ties fall back to a
deterministic comparison of addr and meta so every member converges to the same
view whatever order updates arrive in. Meta is only carried by `alive` entries and
is versioned by the incarnation: a member bumps its incarnation to publish new meta.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import orjson

ALIVE, SUSPECT, DEAD, LEFT = 0, 1, 2, 3
STATE_NAMES = ("alive", "suspect", "dead", "left")

MAX_META_BYTES = 512
MAX_NAME_CHARS = 128
MAX_META_KEY_CHARS = 64


def meta_blob(meta: dict) -> bytes:
    return orjson.dumps(meta, option=orjson.OPT_SORT_KEYS)


@dataclass(frozen=True, slots=True)
class Entry:
    """Equal entries agree on every field, meta and accuser included; which of two
    entries wins is `supersedes`, not equality."""

    name: str
    addr: str
    incarnation: int
    state: int
    meta: dict = field(default_factory=dict, hash=False)
    accuser: str | None = None

    def precedence(self) -> tuple:
        return (self.incarnation, self.state, self.addr, meta_blob(self.meta))

    def supersedes(self, other: Entry | None) -> bool:
        if other is None:
            return True
        if (self.incarnation, self.state) != (other.incarnation, other.state):
            return (self.incarnation, self.state) > (other.incarnation, other.state)
        if self.addr != other.addr:
            return self.addr > other.addr
        if self.meta == other.meta:
            return False
        return meta_blob(self.meta) > meta_blob(other.meta)


@dataclass(frozen=True, slots=True)
class MetaUpdate:
    """An alive member's new metadata as its change from the entry at incarnation `base`
    (key -> new value, None: key removed): what gossip carries when a member's metadata
    changes, a fraction of the whole entry. Only a receiver holding that member alive at
    `base` can rebuild the entry (`resolve`); any other asks for the whole entry."""

    name: str
    incarnation: int
    base: int
    changes: dict
    state: int = ALIVE

    def resolve(self, current: Entry | None) -> Entry | None:
        if current is None or current.state != ALIVE or current.incarnation != self.base:
            return None
        meta = {**current.meta, **self.changes}
        for key, value in self.changes.items():
            if value is None:
                del meta[key]
        return Entry(self.name, current.addr, self.incarnation, ALIVE, meta)


def meta_changes(old: dict, new: dict) -> dict | None:
    """What turns `old` into `new` (MetaUpdate.changes); None when a change cannot be
    written so (a key newly set to None, which would read as its removal)."""
    changes = {k: v for k, v in new.items() if k not in old or old[k] != v or type(old[k]) is not type(v)}
    if any(v is None for v in changes.values()):
        return None
    changes.update({k: None for k in old if k not in new})
    return changes


def entry_digest(name: str, incarnation: int, state: int) -> int:
    """64-bit digest of an entry's version; XOR of these summarises a whole view."""
    raw = hashlib.blake2b(
        f"{name}\x00{incarnation}\x00{state}".encode(), digest_size=8
    ).digest()
    return int.from_bytes(raw, "big")
