"""MeshAgent: one gossip member, its agent loop (mesh/agent.py) run in real time over
ZeroMQ by one background thread.

Other threads call members()/advertise(): queries read an immutable snapshot
(published by the agent thread) and never block on the network.
"""

from __future__ import annotations

import logging
import random
import socket
import threading
import time
from collections.abc import Iterable

from .addresses import (
    advertise_host,
    join_host_port,
    parse_seed_list,
    resolve_seeds,
    split_host_port,
)
from .agent import AgentLoop
from .codec import Decoder, validate_meta
from .config import ProtocolConfig
from .core import MeshCore
from .member import Member
from .security import ClusterKeys, load_cluster_keys
from .transport import ZmqTransport

log = logging.getLogger(__name__)

POLL_S = 0.05  # the longest the thread waits before it looks at stop() again


class MeshAgent:
    """One gossip member. Without `secret_file` or `keys` it refuses to run unless
    `insecure=True` says explicitly that anyone who reaches it may join and read."""

    def __init__(
        self,
        bind: str = "0.0.0.0:0",
        seeds: list[str] | str | None = None,
        name: str | None = None,
        meta: dict | None = None,
        secret_file: str | None = None,
        zone: str | None = None,
        advertise: str | None = None,
        config: ProtocolConfig | None = None,
        keys: ClusterKeys | None = None,
        insecure: bool = False,
    ) -> None:
        self._bind_host, self._bind_port = split_host_port(bind, wildcard=True)
        self._seed_specs = parse_seed_list(seeds)
        self._keys = keys if keys is not None else load_cluster_keys(secret_file)
        if self._keys is None and not insecure:
            raise ValueError(
                "no cluster secret: pass secret_file (make one with `mesh keygen PATH`) or "
                "keys, or insecure=True to run an unauthenticated mesh"
            )
        self.zone = zone
        initial = dict(meta or {})
        if zone is not None:
            initial["zone"] = zone
        self._meta = validate_meta(initial)
        self._requested_name = name
        self._advertise = advertise
        self._config = config or ProtocolConfig()
        self._loop: AgentLoop | None = None
        self._advertised_before_start = False
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._joined = threading.Event()
        self._meta_lock = threading.Lock()
        self._leave_on_stop = True
        self.decoder = Decoder()
        self.addr: str | None = None
        self.name: str | None = None

    # ------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Bind (errors raise here), then run the agent in a daemon thread."""
        if self._thread is not None:
            raise RuntimeError("agent already started")
        transport = ZmqTransport(self._bind_host, self._bind_port, self._keys)
        seeds = resolve_seeds(self._seed_specs)  # DNS: once per start
        host = self._advertise or advertise_host(self._bind_host, seeds)
        if self._advertise and ":" in self._advertise and not self._advertise.startswith("["):
            host, port = split_host_port(self._advertise)
            self.addr = join_host_port(host, port)
        else:
            self.addr = join_host_port(host, transport.port)
        self.name = self._requested_name or f"{socket.gethostname()}:{transport.port}"
        specs = self._seed_specs
        with self._meta_lock:
            now = time.monotonic()
            core = MeshCore(self.name, self.addr, now, random.Random(), meta=self._meta, seeds=seeds,
                            config=self._config)
            self._loop = AgentLoop(core, transport, now, decoder=self.decoder, joined=self._joined,
                                   resolve_seeds=(lambda: resolve_seeds(specs)) if specs else None)
            if self._advertised_before_start:
                self._loop.advertise(dict(self._meta))
        self._thread = threading.Thread(target=self._run, name=f"mesh-agent-{self.name}", daemon=True)
        self._thread.start()
        log.info("mesh agent %s listening on %s, seeds %s", self.name, self.addr, seeds or "none")
        if self._keys is None:
            log.warning(
                "mesh agent %s runs insecure: gossip on %s is unauthenticated and unencrypted; "
                "anyone who can reach it can join, read the members and their metadata, and "
                "advertise false ones",
                self.name,
                self.addr,
            )

    def stop(self, leave: bool = True, timeout_s: float = 5.0) -> None:
        """Stop the agent; with leave=True announce `left` first (up to ~1 s)."""
        if self._thread is None:
            return
        self._leave_on_stop = leave
        self._stopping.set()
        self._loop.transport.wake()
        self._thread.join(timeout_s)

    def __enter__(self) -> MeshAgent:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def wait_joined(self, timeout_s: float = 3.0) -> bool:
        """Block until the agent has heard from the mesh (True), or `timeout_s` passed (False).

        With no seeds there is nothing to join and this returns True at once. After it
        returns True the view already holds the seed's full member list.
        """
        if not self._seed_specs:
            return True
        return self._joined.wait(timeout_s)

    @property
    def joined(self) -> bool:
        return self._joined.is_set()

    @property
    def handler_errors(self) -> int:
        """Valid messages the core failed on (dropped)."""
        return 0 if self._loop is None else self._loop.handler_errors

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # --------------------------------------------------------------- queries

    def members(self) -> list[Member]:
        """Every member in the local view, ourselves included (is_self=True)."""
        return [] if self._loop is None else list(self._loop.snapshot()[0])

    @property
    def view_version(self) -> int:
        """Changes of the view so far: read it before `members()` and pass it to
        `wait_for_change` as `seen`, so a change in between is not missed."""
        return 0 if self._loop is None else self._loop.view_version

    def wait_for_change(self, timeout_s: float, seen: int | None = None) -> bool:
        """Block until the view changes (a member, its state or its metadata), at most
        `timeout_s`: whether it did. Readers waiting on the mesh wake at once instead of
        polling `members()`. With `seen` (view_version as read before the last
        `members()`), a change since then returns at once."""
        if self._loop is None:
            time.sleep(timeout_s)
            return False
        return self._loop.wait_for_change(timeout_s, seen)

    @property
    def meta(self) -> dict:
        return dict(self._meta)

    def advertise(self, meta: dict, replace: bool = False, notify: Iterable[str] = ()) -> None:
        """Merge `meta` into our metadata (keys set to None are removed), or replace it;
        `notify`: names of members waiting on this change, told at once."""
        with self._meta_lock:
            merged = {} if replace else dict(self._meta)
            for key, value in meta.items():
                if value is None:
                    merged.pop(key, None)
                else:
                    merged[key] = value
            if self.zone is not None:
                merged.setdefault("zone", self.zone)
            self._meta = validate_meta(merged)
            if self._loop is None:
                self._advertised_before_start = True
            else:
                self._loop.advertise(dict(self._meta), notify)  # bursts are spread as one update
                self._loop.transport.wake()  # gossiped now, not at the loop's next poll

    # ------------------------------------------------------------ the thread

    def _run(self) -> None:
        loop = self._loop
        receive = loop.transport.receive
        try:
            while not loop.finished:
                if self._stopping.is_set() and not loop.stopping:
                    loop.stop(time.monotonic(), leave=self._leave_on_stop)
                    if loop.finished:
                        break
                wait_s = min(max(loop.wakeup_at() - time.monotonic(), 0.0), POLL_S)
                inbound = receive(wait_s)
                loop.step(time.monotonic(), inbound)
        except Exception:
            log.exception("mesh agent thread failed")
        finally:
            loop.close(time.monotonic())
