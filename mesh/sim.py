"""Deterministic virtual-time simulator: many agents, each the real agent loop
(mesh/agent.py, the one MeshAgent runs) over the real protocol core, on a simulated
network.

Only the clock and the network are fake. Every message is encoded with the real codec,
subject to loss, delay and partitions, then decoded and validated by the receiving
agent loop, which drives its core exactly as a real agent does: leave grace, join
detection, seed re-resolution (seeds are node names, resolved to their current
address), advertise coalescing, status queries. Crashes, restarts and CPU stalls (a
paused process: messages and timers wait until it resumes, then the messages are
handled in one batch as a real agent does) are injected by the caller. With `poll_s`,
a node handles what arrives and what falls due up to that much later (uniformly
drawn), as an agent thread does inside a busy process.
The same seed gives the same run.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable
from dataclasses import dataclass

from .agent import AgentLoop
from .codec import MAX_STATUS_BYTES, Decoder, encode
from .config import ProtocolConfig
from .core import MeshCore, Out
from .entries import STATE_NAMES
from .messages import StatusQuery, StatusReply
from .transport import Transport

# (time, observer, member, old state, new state, incarnation)
EventHook = Callable[[float, str, str, int | None, int | None, int], None]
SendHook = Callable[[str, str, bytes], None]  # (sender name, destination addr, datagram)

_MSG, _WAKE = 0, 1
_CLIENT = object()  # the reply handle of a status query from outside the mesh


@dataclass(eq=False)
class SimNode:
    name: str
    addr: str
    loop: AgentLoop | None = None
    transport: SimTransport | None = None
    up: bool = True  # False once crashed, replaced by a restart, or finished leaving
    stalled_until: float = 0.0
    wake_at: float = math.inf
    sent_bytes: int = 0
    sent_messages: int = 0

    @property
    def core(self) -> MeshCore:
        return self.loop.core

    @property
    def decoder(self) -> Decoder:
        return self.loop.decoder


class SimTransport(Transport):
    """One node's end of the simulated network. A datagram's reply handle is the
    sender's address (or the client of a status query)."""

    def __init__(self, sim: Simulator, node: SimNode) -> None:
        self.sim = sim
        self.node = node
        self.inbox: list[tuple[object, bytes]] = []

    def send(self, addr: str, data: bytes) -> None:
        node, sim = self.node, self.sim
        node.sent_bytes += len(data)
        node.sent_messages += 1
        if sim.on_send is not None:
            sim.on_send(node.name, addr, data)
        if sim.loss and sim.rng.random() < sim.loss:
            sim.dropped += 1
            return
        if sim.group_of is not None and sim.group_of.get(addr, -1) != sim.group_of.get(node.addr, -1):
            sim.dropped += 1
            return
        sim._push(sim.now + sim.rng.uniform(*sim.delay_s), _MSG, addr, (node.addr, data))

    def reply(self, handle: object, data: bytes) -> None:
        if handle is _CLIENT:
            self.sim._replies.append(data)
        elif isinstance(handle, str):
            self.send(handle, data)

    def receive(self, timeout_s: float, limit: int = 256) -> list[tuple[object, bytes]]:
        """What was delivered (virtual time does not pass here: the simulator delivers a
        datagram and steps the node at its arrival time)."""
        batch = self.inbox
        if len(batch) <= limit:
            self.inbox = []
            return batch
        self.inbox = batch[limit:]
        return batch[:limit]

    def wake(self) -> None:
        """Nothing waits here: the simulator steps a node whenever it is due."""

    def close(self, linger_s: float = 0.0) -> None:
        self.node.up = False
        self.node.wake_at = math.inf


class Simulator:
    def __init__(
        self,
        seed: int = 0,
        loss: float = 0.0,
        delay_s: tuple[float, float] = (0.0005, 0.005),
        config: ProtocolConfig | None = None,
        on_event: EventHook | None = None,
        on_send: SendHook | None = None,
        poll_s: float = 0.0,
    ) -> None:
        self.seed = seed
        self.poll_s = poll_s
        self.loss = loss
        self.delay_s = delay_s
        self.config = config or ProtocolConfig()
        self.on_event = on_event
        self.on_send = on_send
        self.now = 0.0
        self.rng = random.Random(seed)
        self.nodes: dict[str, SimNode] = {}
        self.by_addr: dict[str, SimNode] = {}
        self.group_of: dict[str, int] | None = None
        self._heap: list = []
        self._seq = 0
        self._generation: dict[str, int] = {}
        self._replies: list[bytes] = []
        self.dropped = 0

    # ------------------------------------------------------------ membership

    def add_node(
        self, name: str, seeds: list[str] = (), meta: dict | None = None, new_addr: bool = False
    ) -> SimNode:
        """Start a member now; `seeds` are names of nodes (or addrs). A name already used
        restarts at its old address, unless `new_addr`: then the old node keeps running
        too (reachable at its address, no longer by name here)."""
        if name in self.nodes and not new_addr:
            addr = self.nodes[name].addr
            self.nodes[name].up = False  # the old process at this address is gone
        else:
            addr = _addr_for(len(self.by_addr))
        generation = self._generation.get(name, -1) + 1
        self._generation[name] = generation
        rng = random.Random(f"{self.seed}/{name}/{generation}")
        specs = list(seeds)
        core = MeshCore(name, addr, self.now, rng, meta=meta, seeds=self._resolve(specs),
                        config=self.config)
        node = SimNode(name, addr)
        node.transport = SimTransport(self, node)
        node.loop = AgentLoop(
            core,
            node.transport,
            self.now,
            resolve_seeds=(lambda: self._resolve(specs)) if specs else None,
            # built when read: nothing reads it from another thread here, and publishing
            # it on every view change would cost O(N) per message
            snapshot_refresh_s=None,
            on_events=lambda events: self._emit(name, events),
        )
        self.nodes[name] = node
        self.by_addr[addr] = node
        node.loop.report_events()  # our own entry, from now
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
        """Stop the agent gracefully, as MeshAgent.stop(leave=True) does."""
        node = self.nodes[name]
        node.loop.stop(self.now, leave=True)
        self._after_step(node)

    def advertise(self, name: str, meta: dict) -> None:
        """Replace the member's metadata, as MeshAgent.advertise(meta, replace=True) does:
        its loop spreads it at its next step, now (unless the node is stalled)."""
        node = self.nodes[name]
        node.loop.advertise(meta)
        self._reschedule(node, self.now)

    def send(self, node: SimNode, out: list[Out]) -> None:
        """Send messages a test made `node`'s core produce outside a step."""
        node.loop.send_all(out)
        node.loop.report_events()
        self._reschedule(node)

    def inject(self, name: str, data: bytes) -> None:
        """Deliver `data` to `name` now, as if sent from outside the mesh (e.g. forged)."""
        self._push(self.now, _MSG, self.nodes[name].addr, (None, data))

    def status(self, name: str, query_id: int = 1) -> StatusReply | None:
        """What `mesh status` gets from `name` now (None if it does not answer)."""
        node = self.nodes[name]
        if not node.up or node.stalled_until > self.now:
            return None
        node.transport.inbox.append((_CLIENT, encode(StatusQuery(query_id))))
        self._step(node)
        replies, self._replies = self._replies, []
        decoded = [Decoder(MAX_STATUS_BYTES).decode(data) for data in replies]
        return next((r for r in decoded if isinstance(r, StatusReply) and r.query_id == query_id),
                    None)

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
            when, _, kind, target, payload = heapq.heappop(heap)
            self.now = when
            node = self.by_addr.get(target) if kind == _MSG else target
            if node is None or not node.up:
                if kind == _MSG:
                    self.dropped += 1
                continue
            if kind == _WAKE:
                if when != node.wake_at:
                    continue  # superseded by an earlier wake-up
                node.wake_at = math.inf
            else:
                node.transport.inbox.append(payload)
            if node.stalled_until > when:  # a paused process: what arrives queues up
                self._reschedule(node, node.stalled_until)
                continue
            if kind == _MSG and self.poll_s:
                self._reschedule(node, when + self._lag())
                continue
            self._step(node)
        self.now = max(self.now, t)

    def run_for(self, duration_s: float) -> None:
        self.run_until(self.now + duration_s)

    # --------------------------------------------------------------- queries

    def view(self, name: str) -> dict[str, str]:
        return {n: STATE_NAMES[e.state] for n, e in self.nodes[name].core.view.entries.items()}

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

    def _resolve(self, specs: list[str]) -> list[str]:
        """Seed names to the current address of the node with that name (others as given)."""
        return [self.nodes[s].addr if s in self.nodes else s for s in specs]

    def _step(self, node: SimNode) -> None:
        """Step `node` now with what it received, then schedule its next wake-up (inlined
        from _reschedule: this runs for every message and timer)."""
        loop, transport, now = node.loop, node.transport, self.now
        loop.step(now, transport.receive(0.0))
        if loop.handler_errors:  # the real loop drops and counts these; here they are bugs
            raise RuntimeError(f"{node.name}: the core failed on a message") from loop.first_handler_error
        if loop.finished:
            loop.close(now)
            return
        # more queued than one step takes: step again at once
        wakeup = now if transport.inbox else loop.wakeup_at() + self._lag()
        if wakeup < now:
            wakeup = now
        if wakeup < node.wake_at:
            node.wake_at = wakeup
            self._seq += 1
            heapq.heappush(self._heap, (wakeup, self._seq, _WAKE, node, None))

    def _after_step(self, node: SimNode) -> None:
        if node.loop.finished:
            node.loop.close(self.now)
        else:
            self._reschedule(node)

    def _reschedule(self, node: SimNode, at: float | None = None) -> None:
        if not node.up:
            return
        if at is None:
            at = self.now if node.transport.inbox else node.loop.wakeup_at()
        wakeup = max(at, self.now, node.stalled_until)
        if wakeup < node.wake_at:
            node.wake_at = wakeup
            self._push(wakeup, _WAKE, node, None)

    def _lag(self) -> float:
        return self.rng.uniform(0.0, self.poll_s) if self.poll_s else 0.0

    def _push(self, when: float, kind: int, target, payload) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, kind, target, payload))

    def _emit(self, observer: str, events) -> None:
        if self.on_event is not None:
            for when, subject, old, new, inc in events:
                self.on_event(when, observer, subject, old, new, inc)


def _addr_for(index: int) -> str:
    return f"10.{index // 65536 % 256}.{index // 256 % 256}.{index % 256}:7946"
