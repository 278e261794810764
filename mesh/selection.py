"""Choosing transfer sources among members: compatible first, then nearest, then least loaded."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .addresses import split_host_port


@dataclass(frozen=True)
class Member:
    """One member as seen by the local agent.

    rtt: smoothed round-trip time of direct probes in seconds (None until measured).
    last_heard: seconds since a message came directly from this member, as of when
    the view was taken (None if never; 0 for ourselves).
    """

    name: str
    addr: str
    state: str
    incarnation: int
    meta: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))
    rtt: float | None = None
    last_heard: float | None = None
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
            "rtt": self.rtt,
            "last_heard": self.last_heard,
        }


def _as_int(value) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


def _load(meta) -> float:
    value = meta.get("load", 0)
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return math.inf
    try:
        load = float(value)
    except ValueError:
        return math.inf
    return load if math.isfinite(load) else math.inf


# Advertised in meta["state"] by a rank that forwards weights while still receiving them.
RECEIVING = "receiving"


def is_compatible(
    member: Member, fingerprint: str, tp: int, pp: int, rank: int, receiving: bool = False
) -> bool:
    """Alive, same key, and ready (or, with `receiving`, already relaying verified buckets)."""
    meta = member.meta
    return (
        member.state == "alive"
        and not member.is_self
        and (bool(meta.get("ready")) or (receiving and meta.get("state") == RECEIVING))
        and meta.get("fingerprint") == fingerprint
        and _as_int(meta.get("tp")) == tp
        and _as_int(meta.get("pp")) == pp
        and _as_int(meta.get("rank")) == rank
    )


def nearness_key(member: Member, own: Member | None, zone: str | None) -> tuple:
    own_host = own.host if own else None
    own_meta_host = own.meta.get("host") if own else None
    same_host = (own_host is not None and member.host == own_host) or (
        own_meta_host is not None and member.meta.get("host") == own_meta_host
    )
    same_zone = zone is not None and member.meta.get("zone") == zone
    # RTT in whole milliseconds: peers that are about equally near are told apart by load
    rtt_ms = math.floor(member.rtt * 1000) if member.rtt is not None else math.inf
    return (not same_host, not same_zone, rtt_ms, _load(member.meta), member.rtt or 0.0, member.name)


def select_sources(
    members: Iterable[Member],
    fingerprint: str,
    tp: int,
    pp: int,
    rank: int,
    own: Member | None = None,
    zone: str | None = None,
    receiving: bool = False,
) -> list[Member]:
    """Alive, ready members advertising exactly this (fingerprint, tp, pp, rank), nearest first;
    with `receiving`, also those still receiving that already forward verified buckets."""
    matches = [m for m in members if is_compatible(m, fingerprint, tp, pp, rank, receiving)]
    matches.sort(key=lambda m: nearness_key(m, own, zone))
    return matches
