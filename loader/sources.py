"""Which peers a rank tries, in order: mesh candidates, then the static SOURCE list."""

from __future__ import annotations

from dataclasses import dataclass, field

from loader.config import NetloaderConfig
from loader.identity import RankIdentity


@dataclass
class SourcePlan:
    sources: list[str] = field(default_factory=list)
    # (where, why) for every place that could not offer a source, for the result line
    failures: list[tuple[str, str]] = field(default_factory=list)


def plan_sources(identity: RankIdentity, config: NetloaderConfig, presence=None) -> SourcePlan:
    """`presence` is this rank's MeshPresence, or None when no mesh is configured."""
    plan = SourcePlan()
    if identity.fingerprint is None:
        plan.failures.append(("fingerprint", identity.fingerprint_error or "unavailable"))
        return plan
    if presence is not None:
        found = presence.candidates()
        plan.sources.extend(found.endpoints)
        if found.reason:
            plan.failures.append(("mesh", found.reason))
    for addr in config.sources_for_rank(identity.rank):
        if addr not in plan.sources:
            plan.sources.append(addr)
    if not plan.sources and (presence is None or config.source):
        plan.failures.append(("SOURCE", f"no source configured for rank {identity.rank}"))
    return plan
