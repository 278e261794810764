"""This rank's presence in the gossip mesh: find peers at startup, advertise once servable.

One agent per worker rank, in the worker's own process: vLLM runs each rank in a
process of its own, so a per-instance agent would need cross-process plumbing, while a
per-rank agent advertises exactly what that rank can serve and dies with it. The mesh
is touched only through MeshAgent's query API (find / advertise / members).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from loader.config import MeshConfig
from loader.integration.identity import RankIdentity
from loader.integration.process_exit import on_process_exit
from loader.integration.vllm_compat import VLLM_VERSION

logger = logging.getLogger(__name__)

POLL_S = 0.1
# Once another member is visible the joiner has had a state sync; give the view this long
# to fill in before deciding that no compatible peer exists.
SETTLE_S = 1.5
STATUS_REFRESH_S = 0.05  # reads the server's status; gossips only when it changed
# progress is gossiped in steps of this size: a few metadata updates per transfer
PROGRESS_STEP = 0.1
ROLE = "vllm-worker"


@dataclass
class Candidates:
    endpoints: list[str]
    reason: str | None  # why there are none, for the result line


class MeshPresence:
    def __init__(self, mesh: MeshConfig, identity: RankIdentity, keys, model_name: str):
        self._mesh = mesh
        self._identity = identity
        self._keys = keys
        self._model_name = model_name
        self._agent = None
        self._stop = threading.Event()
        self._publisher: threading.Thread | None = None
        self._server = None  # the server whose status is advertised (publish replaces it)
        self._status_lock = threading.Lock()
        self._last_status: dict | None = None
        self.start_error: str | None = None

    def start(self) -> None:
        """Join through the seeds. Never raises: a mesh problem means no mesh candidates."""
        from mesh.api import MeshAgent

        try:
            self._agent = MeshAgent(
                bind=_bind_for_rank(self._mesh.bind, self._identity.rank),
                seeds=_seeds_for_rank(self._mesh, self._identity.rank),
                name=_agent_name(self._mesh.name, self._identity.rank),
                meta=self._base_meta(ready=False),
                keys=self._keys,
                zone=self._mesh.zone,
                insecure=self._mesh.insecure,
            )
            self._agent.start()
            on_process_exit(self.stop)
        except Exception as exc:
            self._agent = None
            self.start_error = f"agent did not start: {exc}"
            logger.warning("rank %d: mesh %s", self._identity.rank, self.start_error)

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
            found = self._find(self._agent)
            if found:
                return Candidates(
                    [m.meta["endpoint"] for m in found if m.meta.get("endpoint")], None
                )
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

    def upstream_rows(self) -> list[dict]:
        """The gossip table as `loader.distribution.upstream_choice` reads it: compatible members that
        hold or are receiving this rank's weights, with their transfer status."""
        agent = self._agent
        if agent is None:
            return []
        rows = []
        for m in self._find(agent):
            meta = m.meta
            state = meta.get("state")
            if state not in ("complete", "receiving"):
                state = "complete" if meta.get("ready") else None  # peers without chain status
            if state is None:
                continue
            rows.append(
                {
                    "name": m.name,
                    "endpoint": meta.get("endpoint"),
                    "state": state,
                    "load": meta.get("load", 0),
                    "capacity": meta.get("capacity", 1),
                    "progress": meta.get("progress", 1.0 if state == "complete" else 0.0),
                    "upstream": meta.get("upstream"),
                    "zone": meta.get("zone"),
                    "rtt": m.rtt,
                }
            )
        return rows

    def _find(self, agent) -> list:
        """Members holding or receiving this rank's weights, nearest first."""
        identity = self._identity
        return agent.find(
            identity.fingerprint, identity.tp, identity.pp, identity.rank, receiving=True
        )

    def members(self) -> list:
        """Every member in this rank's view of the mesh (mesh.selection.Member)."""
        agent = self._agent
        return agent.members() if agent is not None else []

    def publish(self, server) -> None:
        """Advertise `server` as this rank's endpoint and keep its status current: state,
        progress, load, capacity, upstream (a RelayServer reports them while receiving;
        any other server is complete). `ready` is advertised once the state is complete.
        A later call replaces the server whose status is kept current."""
        if self._agent is None:
            return
        self._server = server
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
        status = _server_status(server)
        with self._status_lock:
            if status == self._last_status:
                return True
            agent = self._agent
            if agent is None:
                return False
            try:
                agent.advertise({**self._base_meta(ready=status["state"] == "complete"), **status})
            except Exception as exc:
                logger.warning("rank %d: mesh advertise failed: %s", self._identity.rank, exc)
                return False
            became_ready = status["state"] == "complete" and (
                self._last_status is None or self._last_status["state"] != "complete"
            )
            self._last_status = status
        if became_ready:
            logger.info(
                "rank %d: advertised in the mesh as ready: %s (%s), weights on %s",
                self._identity.rank,
                agent.name,
                agent.addr,
                status["endpoint"],
            )
        return True

    def _refresh_status(self) -> None:
        while not self._stop.wait(STATUS_REFRESH_S):
            self._advertise_status(self._server)

    def stop(self) -> None:
        self._stop.set()
        agent, self._agent = self._agent, None
        if agent is not None:
            logger.info("rank %d: leaving the mesh", self._identity.rank)
            agent.stop(leave=True)

    def _base_meta(self, ready: bool) -> dict:
        identity = self._identity
        meta = {
            "role": ROLE,
            "model": self._model_name[-64:],
            "fingerprint": identity.fingerprint or "",
            "tp": identity.tp,
            "pp": identity.pp,
            "rank": identity.rank,
            "ready": ready,
            "vllm": VLLM_VERSION[:32],
        }
        if self._mesh.zone:
            meta["zone"] = self._mesh.zone
        return meta


def _server_status(server) -> dict:
    state = getattr(server, "state", "complete")
    progress = 1.0 if state == "complete" else getattr(server, "verified_fraction", 0.0)
    return {
        "endpoint": server.endpoint,
        "state": state,
        "progress": round(round(progress / PROGRESS_STEP) * PROGRESS_STEP, 3),
        "load": server.active_clients,
        "capacity": server.settings.max_concurrent_clients,
        "upstream": getattr(server, "upstream", None) if state != "complete" else None,
        # bytes kept only to serve (raw copies next to processed weights)
        "retained_bytes": getattr(server, "retained_bytes", 0),
    }


def _bind_for_rank(bind: str | None, rank: int) -> str:
    """`host:port` of the rank's agent: port + rank (so ranks don't collide), 0 stays 0."""
    if not bind:
        return "0.0.0.0:0"
    host, _, port = bind.rpartition(":")
    port_num = int(port)
    return f"{host}:{port_num + rank if port_num else 0}"


def _seeds_for_rank(mesh: MeshConfig, rank: int) -> list[str]:
    """The configured seeds, plus, for ranks > 0, rank 0 of this same instance: otherwise
    the ranks of a seedless first instance would each form a mesh of their own."""
    seeds = list(mesh.seeds)
    if rank > 0 and mesh.bind:
        host, _, port = mesh.bind.rpartition(":")
        if int(port):
            if host in ("0.0.0.0", "::", "[::]", ""):
                host = "127.0.0.1"
            seeds.append(f"{host}:{port}")
    return seeds


def _agent_name(name: str | None, rank: int) -> str | None:
    return f"{name}-r{rank}" if name else None
