"""Which claims about members the core takes from the network, where all of them are untrusted.

- Incarnations: a claim may raise the incarnation we know for a member by at most
  INCARNATION_STEP, and none above INCARNATION_CEILING is taken at all. Members bump
  their own incarnation by one per metadata update or refutation, so a real member's
  jumps stay far below the step, while a forged claim cannot push anyone towards the
  codec's MAX_INCARNATION (that would take 2**36 accepted forgeries) where its
  refutation (claim + 1) would no longer be a valid message. Whoever refutes a claim at
  the ceiling still has INCARNATION_STEP valid incarnations left. The price: a view that
  fell more than 2**16 updates behind a live member (a process paused for hours while
  the member kept advertising) keeps its old entry until that member dies or leaves.
- Addresses: an `alive` claim that moves a member we consider alive or suspect to
  another address is refused (two live agents with the same name would otherwise
  flip it back and forth in a refutation war). Like memberlist we keep the address we
  know, and accept a move once the member is dead or left (a restart elsewhere).

Refused claims are dropped and counted in `dropped` by reason; an address conflict is
also logged at WARNING, once per (name, address).
"""

from __future__ import annotations

import logging
from collections import Counter

from .codec import MAX_INCARNATION
from .entries import STATE_NAMES, Entry

log = logging.getLogger(__name__)

INCARNATION_STEP = 2**16
INCARNATION_CEILING = MAX_INCARNATION - INCARNATION_STEP
MAX_CONFLICT_WARNINGS = 1024  # distinct (name, address) pairs logged; later ones are only counted


class ClaimFilter:
    def __init__(self, owner: str) -> None:
        self.owner = owner  # our own name, for the log
        self.dropped: Counter[str] = Counter()
        self.conflicts_logged: set[tuple[str, str]] = set()

    def credible(self, claimed: int, known: int | None) -> bool:
        """False (and counted) for an incarnation too far above `known` (None: nothing known)."""
        limit = INCARNATION_CEILING if known is None else known + INCARNATION_STEP
        if claimed <= min(limit, INCARNATION_CEILING):
            return True
        self.dropped["incarnation"] += 1
        return False

    def conflict(self, claim: Entry, current: Entry) -> None:
        """An `alive` claim for a live member (or for us) from another address: count it,
        and log it once per (name, address)."""
        self.dropped["address conflict"] += 1
        key = (claim.name, claim.addr)
        if key in self.conflicts_logged or len(self.conflicts_logged) >= MAX_CONFLICT_WARNINGS:
            return
        self.conflicts_logged.add(key)
        if claim.name == self.owner:
            log.warning("%s: another member at %s uses our name (we are at %s)",
                        self.owner, claim.addr, current.addr)
        else:
            log.warning("%s: conflicting address for %s: %s claims it, but it is %s at %s; "
                        "keeping %s (is the name used twice?)", self.owner, claim.name, claim.addr,
                        STATE_NAMES[current.state], current.addr, current.addr)
