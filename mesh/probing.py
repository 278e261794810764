"""Failure detection: SWIM's probe round, with indirect probes through helpers.

Every probe interval the next member of a randomized round-robin order gets a Ping
(newcomers join the round at a random place; a member hearing of a new suspicion
probes the suspect next, so a real failure collects independent confirmations quickly
while a healthy suspect just answers). Without an Ack by the probe timeout, a second
direct Ping and a PingReq to k helpers follow; a helper that hears nothing in time
answers Nack, which tells us our own network works. A probe still unanswered at the
end of the interval makes the prober accuse its target. Missed acks and nacks raise
the local awareness score (mesh/awareness.py), which stretches both timings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .awareness import Awareness
from .config import ProtocolConfig
from .entries import ALIVE, SUSPECT
from .messages import Ack, MemberMessage, Nack, Ping, PingReq
from .rumors import RumorQueue
from .view import View

Out = tuple[str, MemberMessage]
MAX_HELP_REQUESTS = 256  # indirect probes we run for others at once


@dataclass(slots=True)
class Probe:
    target: str
    seq: int
    start: float
    timeout_at: float
    end_at: float
    indirect_sent: bool = False
    expected_nacks: int = 0
    nacks: int = 0


@dataclass(slots=True)
class HelpRequest:
    requester_addr: str
    requester_seq: int
    nack_at: float


class Prober:
    def __init__(self, name: str, addr: str, now: float, rng, config: ProtocolConfig, view: View,
                 awareness: Awareness, rumors: RumorQueue) -> None:
        self.name = name
        self.addr = addr
        self.rng = rng
        self.config = config
        self.view = view
        self.awareness = awareness
        self.rumors = rumors
        self.probe: Probe | None = None
        self.helping: dict[int, HelpRequest] = {}
        self.order: list[str] = []  # the rest of the current round, next target last
        self.seq = rng.randrange(1 << 24)
        self.sync_due = False  # the next probe carries our view hash (anti-entropy)
        self.next_probe_at = now + rng.uniform(0, config.probe_interval_s)

    # ------------------------------------------------------------ the round

    def member_added(self, name: str) -> None:
        """A newcomer joins the current round at a random position."""
        self.order.insert(self.rng.randint(0, len(self.order)), name)

    def probe_next(self, name: str) -> None:
        self.order.append(name)

    def _next_target(self) -> str | None:
        entries = self.view.entries
        for _ in range(2):
            while self.order:
                name = self.order.pop()
                entry = entries.get(name)
                if entry is not None and entry.state in (ALIVE, SUSPECT):
                    return name
            self.order = [n for n, e in entries.items()
                          if n != self.name and e.state in (ALIVE, SUSPECT)]
            self.rng.shuffle(self.order)
        return None

    def _next_seq(self) -> int:
        self.seq = (self.seq + 1) % (1 << 24)  # only a few probes are ever outstanding
        return self.seq

    # --------------------------------------------------------------- timers

    def next_deadline(self) -> float:
        deadline = self.next_probe_at
        probe = self.probe
        if probe is not None:
            if probe.end_at < deadline:
                deadline = probe.end_at
            if not probe.indirect_sent and probe.timeout_at < deadline:
                deadline = probe.timeout_at
        if self.helping:
            deadline = min(deadline, *[h.nack_at for h in self.helping.values()])
        return deadline

    def tick(self, now: float, out: list[Out], accuse: Callable[[float, str], None]) -> None:
        """Indirect probes, the end of a failed probe (`accuse` its target), the next probe."""
        multiplier = self.awareness.multiplier  # as it was before this tick's outcome
        probe = self.probe
        if probe is not None and not probe.indirect_sent and now >= probe.timeout_at:
            self._probe_indirectly(probe, out)
        if probe is not None and now >= probe.end_at:
            self.probe = None
            missed = probe.expected_nacks - probe.nacks if probe.expected_nacks else 1
            self.awareness.adjust(max(missed, 0))
            accuse(now, probe.target)
        if now >= self.next_probe_at:
            self._start_probe(now, multiplier, out)

    def help_tick(self, now: float, out: list[Out]) -> None:
        for seq, req in list(self.helping.items()):
            if now >= req.nack_at:
                del self.helping[seq]
                out.append((req.requester_addr, Nack(self.name, req.requester_seq)))

    def _probe_indirectly(self, probe: Probe, out: list[Out]) -> None:
        probe.indirect_sent = True
        target = self.view.get(probe.target)
        if target is None:
            return
        helpers = self.view.sample(self.rng, self.config.indirect_checks, states=(ALIVE,),
                                   exclude=(probe.target,))
        probe.expected_nacks = len(helpers)
        # a second direct ping, like memberlist's TCP fallback: one lost datagram should
        # not be enough to start a suspicion
        out.append((target.addr, Ping(self.name, self.addr, probe.seq, probe.target)))
        for helper in helpers:
            preq = PingReq(self.name, self.addr, probe.seq, probe.target, target.addr)
            out.append((self.view.entries[helper].addr, preq))

    def _start_probe(self, now: float, multiplier: int, out: list[Out]) -> None:
        c = self.config
        target = self._next_target()
        if target is None:
            self.next_probe_at = now + c.probe_interval_s
            return
        seq = self._next_seq()
        self.probe = Probe(target=target, seq=seq, start=now,
                           timeout_at=now + c.probe_timeout_s * multiplier,
                           end_at=now + c.probe_interval_s * multiplier)
        self.next_probe_at = now + c.probe_interval_s * multiplier
        entry = self.view.entries[target]
        first = [entry] if entry.state == SUSPECT else []  # buddy system: tell the suspect first
        view_hash, self.sync_due = (self.view.hash if self.sync_due else None), False
        out.append((entry.addr, Ping(self.name, self.addr, seq, target, self.rumors.take(first), view_hash)))

    # ------------------------------------------------------------- messages

    def on_ping(self, now: float, msg: Ping, out: list[Out]) -> None:
        if msg.target == self.name:
            out.append((msg.sender_addr, Ack(self.name, msg.seq, self.rumors.take())))

    def on_ack(self, now: float, msg: Ack, out: list[Out]) -> None:
        probe = self.probe
        if probe is not None and msg.seq == probe.seq:
            direct = msg.sender == probe.target and not probe.indirect_sent
            if direct and probe.target in self.view.entries:
                info = self.view.local[probe.target]
                sample = max(0.0, now - probe.start)
                a = self.config.rtt_smoothing
                info.rtt_s = sample if info.rtt_s is None else (1 - a) * info.rtt_s + a * sample
            self.probe = None
            self.awareness.adjust(-1)
            return
        help_req = self.helping.pop(msg.seq, None)
        if help_req is not None:
            out.append((help_req.requester_addr, Ack(self.name, help_req.requester_seq)))

    def on_nack(self, now: float, msg: Nack, out: list[Out]) -> None:
        if self.probe is not None and msg.seq == self.probe.seq:
            self.probe.nacks += 1

    def on_ping_req(self, now: float, msg: PingReq, out: list[Out]) -> None:
        if len(self.helping) >= MAX_HELP_REQUESTS:
            return
        seq = self._next_seq()
        nack_at = now + 0.8 * self.config.probe_timeout_s
        self.helping[seq] = HelpRequest(msg.sender_addr, msg.seq, nack_at)
        out.append((msg.target_addr, Ping(self.name, self.addr, seq, msg.target)))
