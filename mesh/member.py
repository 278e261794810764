"""One member as the query API shows it: the row type of MeshAgent.members() and `mesh status`.

Its metadata is opaque to the mesh: what the keys mean is up to whoever advertises them."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .addresses import split_host_port


@dataclass(frozen=True)
class Member:
    """One member as seen by the local agent.

    rtt_s: smoothed round-trip time of direct probes (None until measured).
    last_heard_s: seconds since a message came directly from this member, as of when
    the view was taken (None if never; 0 for ourselves).
    """

    name: str
    addr: str
    state: str
    incarnation: int
    meta: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))
    rtt_s: float | None = None
    last_heard_s: float | None = None
    is_self: bool = False

    @property
    def host(self) -> str:
        try:
            return split_host_port(self.addr)[0]
        except ValueError:
            return ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "addr": self.addr,
            "state": self.state,
            "incarnation": self.incarnation,
            "meta": dict(self.meta),
            "rtt": self.rtt_s,
            "last_heard": self.last_heard_s,
        }
