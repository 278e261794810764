"""Deterministic virtual-time simulator running many MeshCore instances.

Only the clock and the network are fake: every message is encoded with the real
codec, subject to loss, delay and partitions, decoded and validated at the receiver
and handed to the real protocol core. Crashes, restarts and CPU stalls (a paused
process: messages and timers wait until it resumes) are injected by the caller.
The same seed gives the same run.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from .codec import Decoder, encode
from .config import ProtocolConfig
from .core import MeshCore
from .members import STATE_NAMES

EventHook = Callable[[float, str, str, int | None, int | None, int], None]


@dataclass
class SimNode:
    name: str
    addr: str
    core: MeshCore
    up: bool = True
    stalled_until: float = 0.0
    wake_at: float = math.inf
    sent_bytes: int = 0
    sent_messages: int = 0
    decoder: Decoder = field(default_factory=Decoder)


class Simulator:
    def __init__(
        self,
        seed: int = 0,
        loss: float = 0.0,
        delay_s: tuple[float, float] = (0.0005, 0.005),
        config: ProtocolConfig | None = None,
        on_event: EventHook | None = None,
    ) -> None:
        self.seed = seed
        self.loss = loss
        self.delay_s = delay_s
        self.config = config or ProtocolConfig()
        self.on_event = on_event
        self.now = 0.0
        self.rng = random.Random(seed)
        self.nodes: dict[str, SimNode] = {}
        self.by_addr: dict[str, SimNode] = {}
        self.group_of: dict[str, int] | None = None
        self._heap: list = []
        self._seq = 0
        self._generation: dict[str, int] = {}
        self.delivered = 0
        self.dropped = 0

    # ------------------------------------------------------------ membership

    def add_node(
        self, name: str, seeds: list[str] = (), meta: dict | None = None, new_addr: bool = False
    ) -> SimNode:
        """Start a member now; `seeds` are names of existing nodes (or addrs). A name
        already used restarts at its old address, unless `new_addr`: then the old node
        keeps running too (reachable at its address, no longer by name here)."""
        if name in self.nodes and not new_addr:
            addr = self.nodes[name].addr
        else:
            addr = _addr_for(len(self.by_addr))
        generation = self._generation.get(name, -1) + 1
        self._generation[name] = generation
        rng = random.Random(f"{self.seed}/{name}/{generation}")
        seed_addrs = [self.nodes[s].addr if s in self.nodes else s for s in seeds]
        core = MeshCore(name, addr, self.now, rng, meta=meta, seeds=seed_addrs, config=self.config)
        node = SimNode(name, addr, core)
        self.nodes[name] = node
        self.by_addr[addr] = node
        self._emit(node)
        self._reschedule(node)
        return node

    def restart(self, name: str, meta: dict | None = None) -> SimNode:
        """Start a fresh process (incarnation 0) under an existing name and address."""
        seeds = [n.addr for n in self.nodes.values() if n.name != name][:3]
        return self.add_node(name, seeds=seeds, meta=meta)

    def crash(self, name: str) -> None:
        node = self.nodes[name]
        node.up = False
        node.wake_at = math.inf

    def leave(self, name: str) -> None:
        node = self.nodes[name]
        self._dispatch(node, node.core.leave(self.now))
        self._emit(node)
        self._reschedule(node)

    def advertise(self, name: str, meta: dict) -> None:
        node = self.nodes[name]
        self._dispatch(node, node.core.advertise(self.now, meta))
        self._emit(node)
        self._reschedule(node)

    def inject(self, name: str, data: bytes) -> None:
        """Deliver `data` to `name` now, as if sent from outside the mesh (e.g. forged)."""
        self._push(self.now, "msg", self.nodes[name].addr, data)

    def stall(self, name: str, duration_s: float) -> None:
        node = self.nodes[name]
        node.stalled_until = max(node.stalled_until, self.now + duration_s)

    def partition(self, *groups) -> None:
        """Only members of the same group can talk; names not listed form their own group."""
        self.group_of = {}
        for i, group in enumerate(groups):
            for name in group:
                self.group_of[self.nodes[name].addr] = i

    def heal(self) -> None:
        self.group_of = None

    # ------------------------------------------------------------------- run

    def run_until(self, t: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= t:
            when, _, kind, addr, payload = heapq.heappop(heap)
            self.now = when
            node = self.by_addr.get(addr)
            if node is None or not node.up:
                if kind == "msg":
                    self.dropped += 1
                continue
            if node.stalled_until > when:
                if kind == "wake":
                    if payload is not node.core or when != node.wake_at:
                        continue
                    node.wake_at = node.stalled_until
                self._push(node.stalled_until, kind, addr, payload)
                continue
            if kind == "wake":
                if payload is not node.core or when != node.wake_at:
                    continue
                node.wake_at = math.inf
                self._dispatch(node, node.core.tick(when))
            else:
                msg = node.decoder.decode(payload)
                if msg is None:
                    continue
                self.delivered += 1
                self._dispatch(node, node.core.handle(when, msg))
            self._emit(node)
            self._reschedule(node)
        self.now = max(self.now, t)

    def run_for(self, duration_s: float) -> None:
        self.run_until(self.now + duration_s)

    # --------------------------------------------------------------- queries

    def view(self, name: str) -> dict[str, str]:
        return {n: STATE_NAMES[e.state] for n, e in self.nodes[name].core.view.items()}

    def up_nodes(self) -> list[SimNode]:
        return [n for n in self.nodes.values() if n.up and not n.core.leaving]

    def converged(self, expect: dict[str, str] | None = None) -> bool:
        """Every running node sees every running node alive (and `expect` states)."""
        running = self.up_nodes()
        names = {n.name for n in running}
        for node in running:
            view = self.view(node.name)
            if any(view.get(n) != "alive" for n in names):
                return False
            if expect and any(view.get(n) != s for n, s in expect.items()):
                return False
        return True

    # -------------------------------------------------------------- plumbing

    def _dispatch(self, node: SimNode, out) -> None:
        for addr, msg in out:
            data = encode(msg)
            node.sent_bytes += len(data)
            node.sent_messages += 1
            if self.loss and self.rng.random() < self.loss:
                self.dropped += 1
                continue
            if self.group_of is not None and (
                self.group_of.get(addr, -1) != self.group_of.get(node.addr, -1)
            ):
                self.dropped += 1
                continue
            self._push(self.now + self.rng.uniform(*self.delay_s), "msg", addr, data)

    def _reschedule(self, node: SimNode) -> None:
        if not node.up:
            return
        deadline = max(node.core.next_deadline(), self.now)
        if deadline < node.wake_at:
            node.wake_at = deadline
            self._push(deadline, "wake", node.addr, node.core)

    def _push(self, when: float, kind: str, addr: str, payload) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, kind, addr, payload))

    def _emit(self, node: SimNode) -> None:
        events = node.core.drain_events()
        if self.on_event is not None:
            for when, subject, old, new, inc in events:
                self.on_event(when, node.name, subject, old, new, inc)


def _addr_for(index: int) -> str:
    return f"10.{index // 65536 % 256}.{index // 256 % 256}.{index % 256}:7946"
