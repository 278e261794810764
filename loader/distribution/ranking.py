"""Which upstream a rank attaches to, decided by each rank alone from its view of the
mesh: the one ranking rule, for the first lookup and for every re-attach.

Who qualifies (`upstream_table`): alive members other than ourselves whose peer record
(loader.distribution.peer_record) has exactly this rank's fingerprint, tp, pp and rank,
an endpoint, and is ready (complete) or receiving (relaying the buckets it verified).
Peers that gossip no transfer state count as complete. For resharding
(`reshard_table`): complete members with this rank's content id in another shape.

In which order (`rank_upstreams`), never ourselves nor anyone whose chain of upstreams
leads back to us (a cycle):

    instances already at capacity last (they answer "busy"); then same host, same zone,
    RTT within a factor of two counting as equally near, least loaded, complete before
    receiving, further ahead, and the name.

Simultaneous newcomers may pick the same instance; it takes `capacity` of them and
tells the others "busy", who re-read the table and pick again. With capacity 1
everywhere this forms a chain behind the root, without a coordinator.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from loader.distribution.peer_record import PeerRecord, RankIdentity, TransferState

if TYPE_CHECKING:
    from mesh.member import Member


@dataclass(frozen=True)
class Upstream:
    """A member that holds or is receiving this rank's weights, as the ranking sees it."""

    name: str
    endpoint: str
    state: TransferState  # COMPLETE or RECEIVING
    progress: float
    load: int
    capacity: int | None  # None: not advertised, never counted as busy
    upstream: str | None
    zone: str | None
    rtt_s: float | None  # measured by our mesh agent
    same_host: bool = False


def upstream_table(members: Iterable[Member], identity: RankIdentity) -> list[Upstream]:
    """The members that could serve this rank (untrusted metadata: unreadable ones are skipped)."""
    return _table(members, lambda record: _serves(record, identity))


def waiting_members(members: Iterable[Member], identity: RankIdentity) -> list[tuple[str, str]]:
    """(name, endpoint) of the alive members, ourselves included, whose relay gossips this
    rank's weights as attaching: the newcomers that wait for an upstream slot together
    (they take turns at free slots in endpoint order, loader.distribution.reattach, and
    are told at once, in that order, when a slot comes free)."""
    found = []
    for member in members:
        record = PeerRecord.from_meta(member.meta)
        if (
            member.state == "alive"
            and record is not None
            and record.endpoint
            and record.state is TransferState.ATTACHING
            and (record.fingerprint, record.tp, record.pp, record.rank)
            == (identity.fingerprint, identity.tp, identity.pp, identity.rank)
        ):
            found.append((member.name, record.endpoint))
    return sorted(found, key=lambda named: (named[1], named[0]))


def reshard_table(members: Iterable[Member], identity: RankIdentity) -> list[Upstream]:
    """The members that hold these weights complete in another shape: same content id,
    another (tp, pp, rank). A resharding client asks several of them for parts of its
    shard; rank_upstreams orders them like any upstream."""
    return _table(members, lambda record: _reshards(record, identity))


def cache_table(members: Iterable[Member], compile_key: str) -> list[Upstream]:
    """The members that offer the compile cache entry `compile_key`, whatever weights they
    hold: the key covers everything compiled code depends on."""
    return _table(
        members,
        lambda r: r is not None and bool(r.endpoint) and r.compile_key == compile_key,
    )


def _table(members: Iterable[Member], qualifies) -> list[Upstream]:
    members = list(members)
    own = next((m for m in members if m.is_self), None)
    own_record = PeerRecord.from_meta(own.meta) if own is not None else None
    own_meta_host = own_record.host if own_record is not None else None
    table = []
    for member in members:
        record = PeerRecord.from_meta(member.meta)
        if member.state != "alive" or member.is_self or not qualifies(record):
            continue
        state = record.state if record.state is TransferState.RECEIVING else TransferState.COMPLETE
        same_host = (own is not None and member.host == own.host) or (
            own_meta_host is not None and record.host == own_meta_host
        )
        progress = record.progress
        if progress is None:
            progress = 1.0 if state is TransferState.COMPLETE else 0.0
        table.append(
            Upstream(member.name, record.endpoint, state, progress, record.load or 0,
                     record.capacity, record.upstream, record.zone, member.rtt_s, same_host)
        )
    return table


def _serves(record: PeerRecord | None, identity: RankIdentity) -> bool:
    return (
        record is not None
        and bool(record.endpoint)
        and (record.ready or record.state is TransferState.RECEIVING)
        and (record.fingerprint, record.tp, record.pp, record.rank)
        == (identity.fingerprint, identity.tp, identity.pp, identity.rank)
    )


def _reshards(record: PeerRecord | None, identity: RankIdentity) -> bool:
    return (
        record is not None
        and bool(record.endpoint)
        and record.ready
        and record.state in (None, TransferState.COMPLETE)
        and identity.content is not None
        and record.content == identity.content
        and (record.tp, record.pp, record.rank) != (identity.tp, identity.pp, identity.rank)
    )


def rtt_class(rtt_s: float | None) -> int:
    """0 below 1 ms, then one class per doubling: links within 2x count as equally near."""
    if rtt_s is None or not math.isfinite(rtt_s) or rtt_s < 0:
        return 1 << 20
    return 0 if rtt_s < 0.001 else 1 + int(math.log2(rtt_s * 1000))


def rank_upstreams(
    table: Iterable[Upstream], self_endpoint: str | None = None, zone: str | None = None
) -> list[str]:
    """Endpoints to try, best first."""
    table = list(table)
    upstream_of = {row.endpoint: row.upstream for row in table}
    rows = []
    for u in table:
        if self_endpoint and _receives_from(u, self_endpoint, upstream_of):
            continue  # ourselves, or it receives from us: attaching would make a cycle
        rows.append(
            (
                u.capacity is not None and u.load >= u.capacity,
                not u.same_host,
                zone is not None and u.zone != zone,
                rtt_class(u.rtt_s),
                u.load,
                u.state is not TransferState.COMPLETE,
                -u.progress,
                u.name,
                u.endpoint,
            )
        )
    return list(dict.fromkeys(row[-1] for row in sorted(rows)))  # best row per endpoint


def _receives_from(u: Upstream, endpoint: str, upstream_of: dict[str, str | None]) -> bool:
    """Whether `u` is `endpoint` or, as far as the table shows (`upstream_of`: endpoint ->
    its upstream), receives from it through any number of hops."""
    seen: set[str] = set()
    hop: str | None = u.endpoint
    while hop is not None and hop not in seen:
        if hop == endpoint:
            return True
        seen.add(hop)
        hop = u.upstream if hop == u.endpoint else upstream_of.get(hop)
    return False
