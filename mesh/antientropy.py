"""Anti-entropy (push-pull) between two views, cheap when they agree.

Every sync interval a member sends one 64-bit view hash (Sync) to a random member
(now and then to a dead one, to heal partitions). Only on a mismatch does the receiver
answer with a digest of (name, incarnation, state) rows, and the first side then sends
the entries the other lacks and names those it wants (Delta). Joins and reconnects
exchange full state (PushState). Whatever is sent is cut, at random, to fit in one
message.
"""

from __future__ import annotations

import orjson

from .codec import MAX_MESSAGE_BYTES, entry_wire
from .entries import ALIVE, DEAD, Entry
from .messages import DigestRow
from .view import View

# budget for the entries or digest rows of one message; the rest of it fits in the remainder
STATE_BUDGET = MAX_MESSAGE_BYTES - 16 * 1024


def fit(rng, items: list, budget: int, wire=None) -> list:
    """`items`, or as many of them (a random choice) as encode within `budget` bytes as
    a list; `wire(item)` is an item's wire form (default: the item itself)."""
    wires = items if wire is None else [wire(item) for item in items]
    if len(orjson.dumps(wires)) <= budget:
        return items
    pairs = list(zip(items, wires, strict=True))
    rng.shuffle(pairs)
    fitted: list = []
    used = 2
    for item, item_wire in pairs:
        used += len(orjson.dumps(item_wire)) + 1
        if used > budget:
            break
        fitted.append(item)
    return fitted


def sync_target(view: View, rng, reconnect_probability: float) -> str | None:
    """A random alive member, or sometimes a dead one (a partition may have healed)."""
    target = None
    if rng.random() < reconnect_probability:
        dead = view.sample(rng, 1, states=(DEAD,))
        target = dead[0] if dead else None
    if target is None:
        alive = view.sample(rng, 1, states=(ALIVE,))
        target = alive[0] if alive else None
    return target


def digest(view: View, rng) -> tuple[DigestRow, ...]:
    rows = [(n, e.incarnation, e.state) for n, e in view.entries.items()]
    return tuple(fit(rng, rows, STATE_BUDGET))


def compare(view: View, rows: tuple[DigestRow, ...], rng) -> tuple[tuple[Entry, ...], tuple[str, ...]]:
    """Against the other side's digest: (our entries it lacks or has older, names of the
    entries it has newer or we never saw alive)."""
    entries = view.entries
    theirs = set()
    send: list[Entry] = []
    want: list[str] = []
    for name, inc, state in rows:
        theirs.add(name)
        mine = entries.get(name)
        if mine is None:
            if state == ALIVE:
                want.append(name)
        elif (inc, state) > (mine.incarnation, mine.state):
            want.append(name)
        elif (inc, state) < (mine.incarnation, mine.state):
            send.append(mine)
    send += [e for n, e in entries.items() if n not in theirs]
    want = fit(rng, want, STATE_BUDGET // 2)
    send = fit(rng, send, STATE_BUDGET // 2, entry_wire)
    return tuple(send), tuple(want)


def wanted(view: View, names: tuple[str, ...], rng) -> tuple[Entry, ...]:
    entries = view.entries
    return tuple(fit(rng, [entries[n] for n in names if n in entries], STATE_BUDGET, entry_wire))


def full_state(view: View, rng) -> tuple[Entry, ...]:
    return tuple(fit(rng, list(view.entries.values()), STATE_BUDGET, entry_wire))
