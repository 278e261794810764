"""This rank's presence in the gossip mesh: find peers at startup, advertise once servable.

One agent per worker rank, in the worker's own process: vLLM runs each rank in a
process of its own, so a per-instance agent would need cross-process plumbing, while a
per-rank agent advertises exactly what that rank can serve and dies with it. The mesh
is touched only through MeshAgent's query API (members / advertise); what the metadata
means is loader.distribution.peer_record, whom to attach to loader.distribution.ranking.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from loader.config import MeshConfig
from loader.distribution.peer_record import PeerRecord, RankIdentity, TransferState
from loader.distribution.ranking import (
    Upstream,
    cache_table,
    rank_upstreams,
    reshard_table,
    upstream_table,
    waiting_members,
)
from mesh.addresses import WILDCARD_HOSTS, join_host_port, split_host_port

log = logging.getLogger(__name__)

POLL_S = 0.1
# Once another member is visible the joiner has had a state sync; give the view this long
# to fill in before deciding that no compatible peer exists.
SETTLE_S = 1.5
# reads the server's status this often, and at once when the server says it changed
# (state, load, upstream); gossips only what changed
STATUS_REFRESH_S = 0.05
# progress is gossiped in steps of this size: a few metadata updates per transfer
PROGRESS_STEP = 0.1
ROLE = "vllm-worker"


@dataclass
class Candidates:
    endpoints: list[str]
    reason: str | None  # why there are none, for the result line


class MeshPresence:
    def __init__(
        self,
        mesh: MeshConfig,
        identity: RankIdentity,
        keys,
        model_name: str,
        vllm_version: str | None = None,
    ):
        self._mesh = mesh
        self._identity = identity
        self._keys = keys
        self._model_name = model_name
        self._vllm_version = vllm_version
        self._agent = None
        self._stop = threading.Event()
        self._status_hint = threading.Event()
        self._publisher: threading.Thread | None = None
        self._server = None  # the server whose status is advertised (publish replaces it)
        self._status_lock = threading.Lock()
        self._last_record: PeerRecord | None = None
        self._rows_cache: tuple[list, list[Upstream]] = ([], [])
        self.start_error: str | None = None

    def start(self) -> None:
        """Join through the seeds. Never raises: a mesh problem means no mesh candidates.
        The caller stops it (stop() is idempotent, fit for an exit hook)."""
        from mesh.api import MeshAgent

        try:
            self._agent = MeshAgent(
                bind=_bind_for_rank(self._mesh.bind, self._identity.rank),
                seeds=_seeds_for_rank(self._mesh, self._identity.rank),
                name=_agent_name(self._mesh.name, self._identity.rank),
                meta=self._record({}).to_meta(),
                keys=self._keys,
                zone=self._mesh.zone,
                insecure=self._mesh.insecure,
            )
            self._agent.start()
        except Exception as exc:
            self._agent = None
            self.start_error = f"agent did not start: {exc}"
            log.warning("rank %d: mesh %s", self._identity.rank, self.start_error)

    def candidates(self) -> Candidates:
        """Endpoints of compatible peers that hold or are receiving the weights, nearest and
        least loaded first, waiting at most `wait_timeout_s` for the mesh to show one."""
        if self._agent is None:
            return Candidates([], self.start_error or "agent not running")
        if not self._mesh.seeds:
            return Candidates([], "no seeds configured (first member of its mesh)")
        deadline = time.monotonic() + self._mesh.wait_timeout_s
        first_peer_seen: float | None = None
        while True:
            found = rank_upstreams(self.upstream_rows(), zone=self._mesh.zone)
            if found:
                return Candidates(found, None)
            now = time.monotonic()
            others = [m for m in self._agent.members() if not m.is_self and m.state == "alive"]
            if others and first_peer_seen is None:
                first_peer_seen = now
            if first_peer_seen is not None and now - first_peer_seen >= SETTLE_S:
                return Candidates(
                    [], f"no ready peer with this model among {len(others)} alive members"
                )
            if now >= deadline:
                return Candidates(
                    [],
                    f"no mesh member reachable through seeds {list(self._mesh.seeds)} "
                    f"within {self._mesh.wait_timeout_s:g}s",
                )
            time.sleep(POLL_S)

    def upstream_rows(self) -> list[Upstream]:
        """The gossip table as `loader.distribution.ranking` reads it: compatible members that
        hold or are receiving this rank's weights, with their transfer status."""
        agent = self._agent
        if agent is None:
            return []
        members = agent.members()
        cached_members, rows = self._rows_cache
        if len(members) == len(cached_members) and all(
            a is b for a, b in zip(members, cached_members, strict=True)
        ):
            return list(rows)  # the same snapshot as last time (it is rebuilt on changes)
        rows = upstream_table(members, self._identity)
        self._rows_cache = (members, rows)
        return list(rows)

    def wait_for_change(self, timeout_s: float, seen: int | None = None) -> None:
        """Until the gossip view changes (then the rows may have), at most `timeout_s`;
        at once if it changed since `view_version` was `seen`."""
        agent = self._agent
        if agent is None:
            time.sleep(timeout_s)
        else:
            agent.wait_for_change(timeout_s, seen)

    @property
    def view_version(self) -> int:
        agent = self._agent
        return agent.view_version if agent is not None else 0

    def upstream_reader(self) -> UpstreamTableReader:
        """A reader of the upstream table for one thread (fetch_with_reattach's
        read_table and wait_for_change)."""
        return UpstreamTableReader(self)

    def waiting_rows(self) -> list[str]:
        """Endpoints of the members (ourselves included) attaching for this rank's weights,
        in turn order."""
        agent = self._agent
        if agent is None:
            return []
        return [endpoint for _, endpoint in waiting_members(agent.members(), self._identity)]

    def reshard_rows(self) -> list[Upstream]:
        """Complete members holding these weights in another shape (TP, PP or rank)."""
        agent = self._agent
        return reshard_table(agent.members(), self._identity) if agent is not None else []

    def reshard_candidates(self) -> list[str]:
        """Their endpoints, best first (the one ranking rule): resharding sources."""
        return rank_upstreams(self.reshard_rows(), zone=self._mesh.zone)


    def cache_sources(self, compile_key: str) -> list[str]:
        """Endpoints of members that offer the compile cache entry `compile_key`, best first."""
        agent = self._agent
        if agent is None:
            return []
        return rank_upstreams(cache_table(agent.members(), compile_key), zone=self._mesh.zone)

    def members(self) -> list:
        """Every member in this rank's view of the mesh (mesh.member.Member)."""
        agent = self._agent
        return agent.members() if agent is not None else []

    def publish(self, server) -> None:
        """Advertise `server` as this rank's endpoint and keep its status current: state,
        progress, load, capacity, upstream (a server whose strategy is a relay reports them
        while receiving; any other server is complete). `ready` is advertised once the state is complete.
        A later call replaces the server whose status is kept current."""
        if self._agent is None:
            return
        self._server = server
        server.on_status_change = self._status_hint.set
        if not self._advertise_status(server) or self._publisher is not None:
            return
        self._publisher = threading.Thread(
            target=self._refresh_status,
            daemon=True,
            name=f"netloader-mesh-status-r{self._identity.rank}",
        )
        self._publisher.start()

    def announce(self, server) -> None:
        """Advertise this rank as a ready source (publishing `server` if not done yet)."""
        self.publish(server)

    def _advertise_status(self, server) -> bool:
        record = self._record(_server_status(server))
        complete = record.state is TransferState.COMPLETE
        with self._status_lock:
            if record == self._last_record:
                return True
            agent = self._agent
            if agent is None:
                return False
            try:
                agent.advertise(record.to_meta(), replace=True, notify=self._waiters_of(agent, record))
            except Exception as exc:
                log.warning("rank %d: mesh advertise failed: %s", self._identity.rank, exc)
                return False
            last = self._last_record
            became_ready = complete and (last is None or last.state is not TransferState.COMPLETE)
            self._last_record = record
        if became_ready:
            log.info(
                "rank %d: advertised in the mesh as ready: %s (%s), weights on %s",
                self._identity.rank,
                agent.name,
                agent.addr,
                record.endpoint,
            )
        return True

    def _waiters_of(self, agent, record: PeerRecord) -> list[str]:
        """Who to tell of this status at once: the newcomers waiting for an upstream, when
        it changes the slots they see (we began to receive or completed; a downstream came
        or left: a slot the table still showed free would be asked in vain)."""
        last = self._last_record
        if record.state not in (TransferState.RECEIVING, TransferState.COMPLETE):
            return []
        if last is not None and (last.state, last.load, last.capacity) == (
            record.state, record.load, record.capacity
        ):
            return []
        members = waiting_members(agent.members(), self._identity)
        return [name for name, _ in members if name != agent.name]

    def _refresh_status(self) -> None:
        while not self._stop.is_set():
            self._status_hint.wait(STATUS_REFRESH_S)
            self._status_hint.clear()
            if not self._stop.is_set():
                self._advertise_status(self._server)

    def stop(self) -> None:
        self._stop.set()
        self._status_hint.set()
        agent, self._agent = self._agent, None
        if agent is not None:
            log.info("rank %d: leaving the mesh", self._identity.rank)
            agent.stop(leave=True)

    def _record(self, status: dict) -> PeerRecord:
        """This rank's peer record; `status` is its server's (none before publish)."""
        identity = self._identity
        return PeerRecord(
            role=ROLE,
            model=self._model_name[-64:],
            fingerprint=identity.fingerprint or "",
            tp=identity.tp,
            pp=identity.pp,
            rank=identity.rank,
            ready=status.get("state") is TransferState.COMPLETE,
            vllm=self._vllm_version[:32] if self._vllm_version else None,
            zone=self._mesh.zone or None,
            content=identity.content,
            **status,
        )


def _server_status(server) -> dict:
    """The transfer fields of the peer record, read from the server (its strategy says
    whether it is still receiving)."""
    state = TransferState(getattr(server, "state", "complete"))
    complete = state is TransferState.COMPLETE
    progress = 1.0 if complete else getattr(server, "verified_fraction", 0.0)
    return {
        "endpoint": server.endpoint,
        "state": state,
        "progress": round(round(progress / PROGRESS_STEP) * PROGRESS_STEP, 3),
        "load": server.active_clients,
        "capacity": server.settings.max_concurrent_clients,
        "upstream": None if complete else getattr(server, "upstream", None),
        "retained_bytes": getattr(server, "retained_bytes", 0),
        "compile_key": _offered_compile_key(server),
    }


def _offered_compile_key(server) -> str | None:
    served = getattr(server, "compile_cache", None)
    return served.offer.key if served is not None else None


def _bind_for_rank(bind: str | None, rank: int) -> str:
    """`host:port` of the rank's agent: port + rank (so ranks don't collide), 0 stays 0."""
    if not bind:
        return "0.0.0.0:0"
    host, port = split_host_port(bind, wildcard=True)
    return join_host_port(host, port + rank if port else 0)


def _seeds_for_rank(mesh: MeshConfig, rank: int) -> list[str]:
    """The configured seeds, plus, for ranks > 0, rank 0 of this same instance: otherwise
    the ranks of a seedless first instance would each form a mesh of their own."""
    seeds = list(mesh.seeds)
    if rank > 0 and mesh.bind:
        host, port = split_host_port(mesh.bind, wildcard=True)
        if port:
            seeds.append(join_host_port("127.0.0.1" if host in WILDCARD_HOSTS else host, port))
    return seeds


def _agent_name(name: str | None, rank: int) -> str | None:
    return f"{name}-r{rank}" if name else None


class UpstreamTableReader:
    """One reader's look at the upstream table: `wait_for_change` wakes at once for a
    change published since this reader's last `rows()` (one published between the read
    and the wait is not missed), whoever else reads the table meanwhile."""

    def __init__(self, presence: MeshPresence) -> None:
        self._presence = presence
        self._seen: int | None = None

    def rows(self) -> list[Upstream]:
        self._seen = self._presence.view_version  # before the read: a later change wakes
        return self._presence.upstream_rows()

    def waiting(self) -> list[str]:
        return self._presence.waiting_rows()

    def wait_for_change(self, timeout_s: float) -> None:
        self._presence.wait_for_change(timeout_s, self._seen)
