"""MeshAgent: the protocol core driven by real time and ZeroMQ in one background thread.

Other threads call find()/members()/advertise(): queries read an immutable snapshot
(refreshed by the agent thread) and never block on the network.
"""

from __future__ import annotations

import logging
import queue
import random
import socket
import threading
import time
from types import MappingProxyType

from .addresses import (
    advertise_host,
    join_host_port,
    parse_seed_list,
    resolve_seeds,
    split_host_port,
)
from .codec import Decoder, encode, validate_meta
from .config import ProtocolConfig
from .core import MeshCore
from .members import STATE_NAMES
from .messages import StatusQuery, StatusReply
from .security import ClusterKeys, load_cluster_keys
from .selection import Member, select_sources
from .transport import ZmqTransport

log = logging.getLogger(__name__)

SNAPSHOT_REFRESH_S = 0.2
SEED_RERESOLVE_S = 10.0
LEAVE_GRACE_S = 1.0


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
        self._bind_host, self._bind_port = split_host_port(bind)
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
        self._commands: queue.Queue = queue.Queue(maxsize=1024)
        self._snapshot: tuple[Member, ...] = ()
        self._self_member: Member | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._joined = threading.Event()
        self._meta_lock = threading.Lock()
        self._leave_on_stop = True
        self._transport: ZmqTransport | None = None
        self._core: MeshCore | None = None
        self.decoder = Decoder()
        self.handler_errors = 0  # valid messages the core failed on (dropped)
        self.addr: str | None = None
        self.name: str | None = None

    # ------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Bind (errors raise here), then run the agent in a daemon thread."""
        if self._thread is not None:
            raise RuntimeError("agent already started")
        transport = ZmqTransport(self._bind_host, self._bind_port, self._keys)
        host = self._advertise or advertise_host(self._bind_host, resolve_seeds(self._seed_specs))
        if self._advertise and ":" in self._advertise and not self._advertise.startswith("["):
            host, port = split_host_port(self._advertise)
            self.addr = join_host_port(host, port)
        else:
            self.addr = join_host_port(host, transport.port)
        self.name = self._requested_name or f"{socket.gethostname()}:{transport.port}"
        seeds = resolve_seeds(self._seed_specs)
        now = time.monotonic()
        self._core = MeshCore(
            self.name, self.addr, now, random.Random(), meta=self._meta, seeds=seeds, config=self._config
        )
        self._transport = transport
        self._refresh_snapshot(now)
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
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # --------------------------------------------------------------- queries

    def members(self) -> list[Member]:
        """Every member in the local view, ourselves included (is_self=True)."""
        return list(self._snapshot)

    def find(
        self, fingerprint: str, tp: int, pp: int, rank: int, receiving: bool = False
    ) -> list[Member]:
        """Alive, ready members advertising this key; same host, same zone, lower RTT, lower load first.
        With `receiving`, members advertising state "receiving" (relaying what they verified) too."""
        return select_sources(
            self._snapshot,
            fingerprint,
            tp,
            pp,
            rank,
            own=self._self_member,
            zone=self.zone,
            receiving=receiving,
        )

    @property
    def meta(self) -> dict:
        return dict(self._meta)

    def advertise(self, meta: dict, replace: bool = False) -> None:
        """Merge `meta` into our metadata (keys set to None are removed), or replace it."""
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
            try:
                self._commands.put_nowait(("advertise", dict(self._meta)))
            except queue.Full:
                raise RuntimeError("mesh agent command queue is full") from None

    # ------------------------------------------------------------ the thread

    def _run(self) -> None:
        core, transport = self._core, self._transport
        last_resolve = time.monotonic()
        last_snapshot = 0.0
        leave_deadline = None
        try:
            while True:
                now = time.monotonic()
                if self._stopping.is_set() and leave_deadline is None:
                    if not self._leave_on_stop:
                        break
                    self._send_all(core.leave(now))
                    leave_deadline = now + LEAVE_GRACE_S
                if leave_deadline is not None and (now >= leave_deadline or not core.rumors):
                    break
                wait_s = min(max(core.next_deadline() - now, 0.0), 0.05)
                for identity, data in transport.receive(wait_s):
                    self._on_datagram(identity, data)
                self._run_commands()
                now = time.monotonic()
                if now >= core.next_deadline():
                    self._send_all(core.tick(now))
                self._log_events(core.drain_events())
                if now - last_snapshot >= SNAPSHOT_REFRESH_S or self._snapshot_version != core.version:
                    self._refresh_snapshot(now)
                    last_snapshot = now
                    if core.joined and core.alive_count > 1:
                        self._joined.set()
                if (
                    self._seed_specs
                    and core.alive_count <= 1
                    and now - last_resolve >= SEED_RERESOLVE_S
                ):
                    last_resolve = now
                    core.set_seeds(resolve_seeds(self._seed_specs))
        except Exception:
            log.exception("mesh agent thread failed")
        finally:
            self._refresh_snapshot(time.monotonic())
            transport.close(linger_s=0.2 if leave_deadline is not None else 0.0)

    def _on_datagram(self, identity: bytes, data: bytes) -> None:
        msg = self.decoder.decode(data)
        if msg is None:
            return
        if isinstance(msg, StatusQuery):
            rows = tuple(m.as_dict() for m in self._snapshot)
            self._transport.reply(identity, encode(StatusReply(msg.query_id, self.name, rows)))
        elif not isinstance(msg, StatusReply):
            try:
                out = self._core.handle(time.monotonic(), msg)
            except Exception:  # a message must never stop the agent: drop it, count it
                self.handler_errors += 1
                if self.handler_errors == 1:
                    log.exception("mesh agent %s: dropped a %s message that failed", self.name,
                                  type(msg).__name__)
                return
            self._send_all(out)

    def _run_commands(self) -> None:
        latest_meta = None
        while True:
            try:
                command, arg = self._commands.get_nowait()
            except queue.Empty:
                break
            if command == "advertise":
                latest_meta = arg  # bursts of updates are spread as one new incarnation
        if latest_meta is not None:
            self._send_all(self._core.advertise(time.monotonic(), latest_meta))

    def _send_all(self, out) -> None:
        for addr, msg in out:
            self._transport.send(addr, encode(msg))

    def _log_events(self, events) -> None:
        for _, name, _old, new, inc in events:
            if name == self.name:
                continue
            if new is None:
                log.debug("member %s forgotten (tombstone expired)", name)
            else:
                log.info("member %s is %s (incarnation %d)", name, STATE_NAMES[new], inc)

    _snapshot_version = -1

    def _refresh_snapshot(self, now: float) -> None:
        core = self._core
        members = []
        own = None
        for entry, info in core.members():
            is_self = entry.name == core.name
            member = Member(
                name=entry.name,
                addr=entry.addr,
                state=STATE_NAMES[entry.state],
                incarnation=entry.incarnation,
                meta=MappingProxyType(dict(entry.meta)),
                rtt=info.rtt_s,
                last_heard=0.0 if is_self else (None if info.last_heard is None else max(0.0, now - info.last_heard)),
                is_self=is_self,
            )
            members.append(member)
            if is_self:
                own = member
        members.sort(key=lambda m: m.name)
        self._snapshot = tuple(members)
        self._self_member = own
        self._snapshot_version = core.version
