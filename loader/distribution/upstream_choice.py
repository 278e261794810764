"""A starting rank's mesh stage: attach to the best upstream the gossip table offers and
re-attach until the weights are in (decisions: loader.distribution.reattach; ranking:
loader.distribution.ranking).
Every attempt continues from the buckets verified so far."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

from loader.distribution.ranking import Upstream
from loader.distribution.reattach import Attempt, GiveUp, Reattach, ReattachPolicy
from loader.transfer.client import FetchOutcome, FetchRequest
from loader.transfer.protocol import is_retryable

log = logging.getLogger(__name__)


def fetch_with_reattach(
    read_table: Callable[[], list[Upstream]],
    self_endpoint: str,
    request: FetchRequest,
    policy: ReattachPolicy,
    wait_for_change: Callable[[float], object] | None = None,
    read_waiting: Callable[[], list[str]] | None = None,
) -> FetchOutcome:
    """Fetch from the best upstream in the table; re-read and re-attach until done or the
    policy gives up. `wait_for_change(seconds)` waits between reads and may return as soon
    as the table changed (MeshPresence.wait_for_change): a relay that just began to
    receive is asked at once, not at the next look (default: sleep them out).
    `read_waiting()`: the endpoints of the newcomers waiting for an upstream, ourselves
    included, with whom we take turns at free slots (Reattach; default: no turns)."""
    started = time.monotonic()
    state = Reattach(policy, self_endpoint, started, random.Random(self_endpoint))
    while True:
        table = read_table()
        waiting = read_waiting() if read_waiting is not None else ()
        decision = state.next(time.monotonic(), table, waiting)
        if isinstance(decision, GiveUp):
            failures = state.failures + [("mesh", decision.reason)]
            return FetchOutcome(
                False, None, 0, time.monotonic() - started, failures, refusals=state.refusals
            )
        if not isinstance(decision, Attempt):
            (wait_for_change or time.sleep)(decision.seconds)
            continue
        outcome = _try_in_turn(decision.candidates, read_table, state, request)
        if outcome.ok:
            # this round's refusals (by candidates before the one that served) count too
            outcome.refusals = state.refusals + sum(is_retryable(why) for _, why in outcome.failures)
            outcome.failures[:0] = state.failures
            outcome.seconds = time.monotonic() - started
            if outcome.refusals:
                log.info(
                    "netloader rank %d: attached to %s after %d busy/not-ready refusals in %.1fs",
                    request.rank,
                    outcome.peer,
                    outcome.refusals,
                    outcome.seconds,
                )
            return outcome
        state.record(time.monotonic(), outcome.failures, table)


def _try_in_turn(candidates, read_table, state: Reattach, request: FetchRequest) -> FetchOutcome:
    """Each candidate in order while a fresh table still offers it: a failing attempt can
    take seconds, and meanwhile a candidate further down may have begun to receive from
    us (attaching to it then would make a cycle in which both wait for the other)."""
    started = time.monotonic()
    failures: list[tuple[str, str]] = []
    for candidate in candidates:
        if not state.offers(candidate, read_table()):
            continue
        outcome = request.from_sources([candidate])
        if outcome.ok:
            outcome.failures[:0] = failures
            return outcome
        failures += outcome.failures
    return FetchOutcome(False, None, 0, time.monotonic() - started, failures)
