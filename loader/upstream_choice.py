"""Where a new instance attaches, decided by each instance alone from the gossip table.

Every instance advertises (mesh meta, or any table with the same fields): `endpoint`,
`state` ("complete" | "receiving" | "attaching"), `load` (active downstream transfers),
`capacity` (how many it serves at once), `progress` (verified fraction), `upstream`
(the endpoint it receives from) and optionally `zone`; the reader may add `rtt`
(seconds, measured by its mesh agent). The rule:

    attach to the nearest instance that has or is receiving the weights (same zone,
    then RTT within a factor of two), least loaded first, complete before receiving,
    further ahead first, then by name; instances already at capacity go last (they
    answer "busy").

Simultaneous newcomers may pick the same instance; it takes `capacity` of them and
tells the others "busy", who re-read the table and pick again. With capacity 1
everywhere this forms a chain behind the root, without a coordinator.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable

from loader.client import FetchOutcome, ResumeState, fetch_from_sources
from loader.protocol import is_retryable

log = logging.getLogger(__name__)
__all__ = ["fetch_with_reattach", "is_retryable", "rank_upstreams", "rtt_class"]
SERVING_STATES = ("complete", "receiving")


def rtt_class(rtt) -> int:
    """0 below 1 ms, then one class per doubling: links within 2x count as equally near."""
    if rtt is None or isinstance(rtt, bool) or not isinstance(rtt, (int, float)):
        return 1 << 20
    if not math.isfinite(rtt) or rtt < 0:
        return 1 << 20
    return 0 if rtt < 0.001 else 1 + int(math.log2(rtt * 1000))


def rank_upstreams(members: list[dict], self_endpoint: str, zone: str | None = None) -> list[str]:
    """Endpoints to try, best first. `members` are untrusted table rows: bad rows are skipped."""
    rows = []
    for m in members:
        try:
            name, endpoint, state = str(m["name"]), str(m["endpoint"]), m["state"]
            load, capacity = int(m.get("load", 0)), int(m.get("capacity", 1))
            progress = float(m.get("progress", 0.0))
        except (KeyError, TypeError, ValueError):
            continue
        if endpoint == self_endpoint or state not in SERVING_STATES or not endpoint:
            continue
        if m.get("upstream") == self_endpoint:
            continue  # it receives from us: attaching would make a cycle
        rows.append(
            (
                load >= capacity,
                zone is not None and m.get("zone") != zone,
                rtt_class(m.get("rtt")),
                load,
                state != "complete",
                -progress,
                name,
                endpoint,
            )
        )
    return list(dict.fromkeys(row[-1] for row in sorted(rows)))  # best row per endpoint


BUSY_BACKOFF_CAP_S = 2.0


def retry_delay_s(busy_rounds: int, base_s: float, rng: random.Random, cap_s: float = BUSY_BACKOFF_CAP_S) -> float:
    """Delay before re-reading the table. After rounds in which every upstream said "busy",
    back off exponentially (with jitter, so newcomers refused together do not come back
    together); otherwise (a relay about to start receiving, an empty table) retry soon."""
    ceiling = min(cap_s, base_s * (2**busy_rounds))
    return ceiling * (0.5 + 0.5 * rng.random())


def fetch_with_reattach(
    read_table: Callable[[], list[dict]],
    self_endpoint: str,
    fingerprint: str,
    tensors,
    rank: int,
    settings,
    keys=None,
    observer=None,
    deadline_s: float = 300.0,
    retry_s: float = 0.05,
    suspect_s: float = 10.0,
    idle_s: float | None = None,
    zone: str | None = None,
    resume: ResumeState | None = None,
) -> FetchOutcome:
    """Fetch from the best upstream in the table; re-read and re-attach until done.

    A source that failed for a reason other than busy/not-ready is skipped for
    `suspect_s` (a dead hop may linger in the table until gossip declares it dead).
    Gives up after `deadline_s`, or once the table has offered no usable upstream for
    `idle_s` (None: keep waiting until the deadline). Every attempt continues from the
    buckets verified so far (`resume`)."""
    started = time.monotonic()
    rng = random.Random(self_endpoint)
    resume = resume if resume is not None else ResumeState()
    failures: list[tuple[str, str]] = []
    suspects: dict[str, float] = {}
    refusals = 0  # "busy" / "not receiving yet" answers: expected while a chain forms
    busy_rounds = 0  # consecutive rounds in which every upstream answered "busy"
    last_offer = started
    while True:
        now = time.monotonic()
        if now - started >= deadline_s:
            failures.append(
                ("mesh", f"no upstream served us within {deadline_s:g}s ({refusals} busy refusals)")
            )
            break
        if idle_s is not None and now - last_offer >= idle_s:
            failures.append(("mesh", f"no usable upstream in the table for {idle_s:g}s"))
            break
        candidates = [
            c for c in rank_upstreams(read_table(), self_endpoint, zone) if suspects.get(c, 0) <= now
        ]
        if candidates:
            last_offer = now
            outcome = fetch_from_sources(
                candidates,
                fingerprint,
                tensors,
                rank,
                settings,
                keys=keys,
                observer=observer,
                resume=resume,
            )
            if outcome.ok:
                outcome.failures[:0] = failures
                outcome.seconds = time.monotonic() - started
                if refusals:
                    log.info(
                        "netloader rank %d: attached to %s after %d busy/not-ready refusals in %.1fs",
                        rank,
                        outcome.peer,
                        refusals,
                        outcome.seconds,
                    )
                return outcome
            for source, reason in outcome.failures:
                if is_retryable(reason):
                    refusals += 1
                else:
                    suspects[source] = time.monotonic() + suspect_s
                    failures.append((source, reason))
            all_busy = all(reason.startswith("busy:") for _, reason in outcome.failures)
            busy_rounds = busy_rounds + 1 if all_busy and outcome.failures else 0
            last_offer = time.monotonic()
        time.sleep(retry_delay_s(busy_rounds, retry_s, rng))
    return FetchOutcome(False, None, 0, time.monotonic() - started, failures)
