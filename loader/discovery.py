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
from loader.identity import RankIdentity
from loader.process_exit import on_process_exit

logger = logging.getLogger(__name__)

POLL_S = 0.1
# Once another member is visible the joiner has had a state sync; give the view this long
# to fill in before deciding that no compatible peer exists.
SETTLE_S = 1.5
LOAD_REFRESH_S = 1.0
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
        self._load_thread: threading.Thread | None = None
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
            )
            self._agent.start()
            on_process_exit(self.stop)
        except Exception as exc:
            self._agent = None
            self.start_error = f"agent did not start: {exc}"
            logger.warning("rank %d: mesh %s", self._identity.rank, self.start_error)

    def candidates(self) -> Candidates:
        """Endpoints of compatible peers, nearest and least loaded first, waiting at most
        `wait_timeout_s` for the mesh to show one."""
        if self._agent is None:
            return Candidates([], self.start_error or "agent not running")
        if not self._mesh.seeds:
            return Candidates([], "no seeds configured (first member of its mesh)")
        identity = self._identity
        deadline = time.monotonic() + self._mesh.wait_timeout_s
        first_peer_seen: float | None = None
        while True:
            found = self._agent.find(identity.fingerprint, identity.tp, identity.pp, identity.rank)
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

    def announce(self, server) -> None:
        """Advertise this rank as a ready source and keep its load figure current."""
        if self._agent is None:
            return
        try:
            self._agent.advertise(
                {
                    **self._base_meta(ready=True),
                    "endpoint": server.endpoint,
                    "load": server.active_clients,
                }
            )
        except Exception as exc:
            logger.warning("rank %d: mesh advertise failed: %s", self._identity.rank, exc)
            return
        self._load_thread = threading.Thread(
            target=self._refresh_load,
            args=(server,),
            daemon=True,
            name=f"netloader-mesh-load-r{self._identity.rank}",
        )
        self._load_thread.start()
        logger.info(
            "rank %d: advertised in the mesh as %s (%s)",
            self._identity.rank,
            self._agent.name,
            self._agent.addr,
        )

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
        }
        if self._mesh.zone:
            meta["zone"] = self._mesh.zone
        return meta

    def _refresh_load(self, server) -> None:
        last = server.active_clients
        while not self._stop.wait(LOAD_REFRESH_S):
            load = server.active_clients
            if load != last and self._agent is not None:
                try:
                    self._agent.advertise({"load": load})
                    last = load
                except Exception as exc:
                    logger.debug("mesh load update failed: %s", exc)


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
