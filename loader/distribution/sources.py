"""Which peers a rank tries, in order: mesh candidates, then the static SOURCE list; then,
for resharding, mesh members of another shape and the SOURCE entries again (a SOURCE
entry may be an instance of another TP/PP shape)."""

from __future__ import annotations

from dataclasses import dataclass, field

from loader.config import NetloaderConfig
from loader.distribution.peer_record import RankIdentity


@dataclass
class SourcePlan:
    mesh: list[str] = field(default_factory=list)  # endpoints the gossip table offered
    static: list[str] = field(default_factory=list)  # SOURCE entries not already in `mesh`
    # sources of these weights in another shape (mesh), then SOURCE entries: resharding
    reshard: list[str] = field(default_factory=list)
    # (where, why) for every place that could not offer a source, for the result line
    failures: list[tuple[str, str]] = field(default_factory=list)

    @property
    def sources(self) -> list[str]:
        return self.mesh + self.static


def plan_sources(identity: RankIdentity, config: NetloaderConfig, presence=None) -> SourcePlan:
    """`presence` is this rank's MeshPresence, or None when no mesh is configured."""
    plan = SourcePlan()
    if identity.fingerprint is None:
        plan.failures.append(("fingerprint", identity.fingerprint_error or "unavailable"))
        return plan
    if presence is not None:
        found = presence.candidates()
        plan.mesh.extend(found.endpoints)
        if found.reason:
            plan.failures.append(("mesh", found.reason))
    static = config.sources_for_rank(identity.rank)
    for addr in static:
        if addr not in plan.sources:
            plan.static.append(addr)
    if identity.content is not None:
        found = presence.reshard_candidates() if presence is not None else []
        plan.reshard = list(dict.fromkeys([*found, *static]))
    if not plan.sources and (presence is None or config.source):
        plan.failures.append(("SOURCE", f"no source configured for rank {identity.rank}"))
    return plan
