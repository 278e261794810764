"""Which upstream a new instance attaches to, decided by each instance alone from the
gossip table: the one ranking rule.

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

import math

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
