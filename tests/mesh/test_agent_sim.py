"""The agent loop (the one MeshAgent runs) in the simulator: leave grace, join detection,
seed re-resolution, advertise coalescing, status queries, and what it does with a
message the core fails on."""

import random

import pytest

from mesh.agent import LEAVE_GRACE_S, SEED_RERESOLVE_S, SNAPSHOT_REFRESH_S, AgentLoop
from mesh.codec import encode
from mesh.core import MeshCore
from mesh.messages import Gossip, StatusQuery, StatusReply
from mesh.sim import Simulator
from tests.mesh.test_protocol_sim import cluster, everyone_sees, run_until


def test_a_leaving_agent_announces_left_then_stops_within_the_grace():
    sim = cluster(10)
    node = sim.nodes["n4"]
    sim.leave("n4")
    assert node.up and node.core.leaving  # still sending its announcement
    stopped = run_until(sim, lambda: not node.up, LEAVE_GRACE_S + 0.1, step=0.01)
    assert stopped is not None and stopped <= LEAVE_GRACE_S
    assert not node.core.rumors  # stopped because everything went out, before the grace ran out
    assert run_until(sim, lambda: everyone_sees(sim, "n4", "left"), 5.0) is not None
    dropped = sim.dropped
    sim.run_for(5.0)
    assert everyone_sees(sim, "n4", "left") and sim.dropped == dropped  # nobody talks to it


def test_join_is_detected_once_another_member_is_alive():
    sim = cluster(5)
    assert all(n.loop.joined.is_set() for n in sim.up_nodes())
    sim.add_node("lonely", seeds=["10.99.99.99:7946"])
    sim.run_for(5.0)
    assert not sim.nodes["lonely"].loop.joined.is_set()
    assert list(sim.view("lonely")) == ["lonely"]


def test_seeds_are_resolved_again_while_alone():
    sim = cluster(3)
    start = sim.now
    sim.add_node("late", seeds=["seed"])  # no node "seed" yet: the name resolves to nothing
    sim.run_for(1.0)
    sim.add_node("seed", seeds=["n0"])
    sim.run_for(SEED_RERESOLVE_S - 1.5)
    assert list(sim.view("late")) == ["late"]  # still trying the unresolved name
    joined = run_until(sim, lambda: everyone_sees(sim, "late", "alive") and sim.converged(), 10.0)
    assert joined is not None
    assert sim.now - start >= SEED_RERESOLVE_S


def test_a_burst_of_advertisements_becomes_one_update():
    sim = cluster(8)
    core = sim.nodes["n3"].core
    before = core.incarnation
    for load in range(5):
        sim.advertise("n3", {"load": load})
    sim.run_for(0.001)
    assert core.incarnation == before + 1 and core.meta == {"load": 4}
    assert run_until(sim, lambda: all(n.core.view["n3"].meta == {"load": 4} for n in sim.up_nodes()),
                     5.0) is not None
    assert all(n.core.view["n3"].incarnation == before + 1 for n in sim.up_nodes())


def test_status_query_is_answered_with_every_member():
    sim = cluster(5)
    sim.crash("n4")
    assert run_until(sim, lambda: sim.view("n2")["n4"] == "dead", 30.0) is not None
    reply = sim.status("n2", query_id=42)
    assert reply.query_id == 42 and reply.responder == "n2"
    rows = {row["name"]: row for row in reply.members}
    assert {n: r["state"] for n, r in rows.items()} == sim.view("n2")
    assert rows["n2"]["last_heard"] == 0.0 and rows["n2"]["addr"] == sim.nodes["n2"].addr
    assert rows["n1"]["rtt"] is not None and rows["n1"]["last_heard"] < 5.0
    assert sim.status("n4") is None  # crashed
    sim.stall("n1", 2.0)
    assert sim.status("n1") is None  # paused: no answer now
    assert sim.nodes["n2"].decoder.accepted > 0


class _Recorder:
    """A Transport that keeps what is sent."""

    def __init__(self):
        self.sent, self.replies, self.closed = [], [], None

    def send(self, addr, data):
        self.sent.append((addr, data))

    def reply(self, handle, data):
        self.replies.append((handle, data))

    def receive(self, timeout_s, limit=256):
        return []

    def close(self, linger_s=0.0):
        self.closed = linger_s


def test_the_loop_drops_and_counts_a_message_the_core_fails_on_and_answers_queries():
    core = MeshCore("me", "10.0.0.1:1", 0.0, random.Random(1))
    transport = _Recorder()
    loop = AgentLoop(core, transport, 0.0)

    def broken(now, msg):
        raise RuntimeError("bug")

    core.handle = broken
    loop.step(1.0, [("peer", encode(Gossip("peer"))), ("peer", b"not json"),
                    ("client", encode(StatusQuery(7)))])
    assert loop.handler_errors == 1 and isinstance(loop.first_handler_error, RuntimeError)
    assert loop.decoder.rejected == {"json": 1} and loop.decoder.accepted == 2
    [(handle, data)] = transport.replies
    assert handle == "client"
    reply = loop.decoder.decode(data)
    assert isinstance(reply, StatusReply) and reply.query_id == 7 and reply.responder == "me"
    assert [row["name"] for row in reply.members] == ["me"]
    loop.stop(1.0, leave=False)
    assert loop.finished
    loop.close(1.0)
    assert transport.closed == 0.0


def test_the_simulator_raises_what_the_real_loop_would_only_count():
    sim = cluster(3)

    def broken(now, msg):
        raise RuntimeError("bug")

    sim.nodes["n1"].core.handle = broken
    with pytest.raises(RuntimeError, match="n1: the core failed") as info:
        sim.run_for(5.0)
    assert str(info.value.__cause__) == "bug"


def test_a_stalled_agent_handles_what_queued_up_in_one_step():
    sim = Simulator(seed=3)
    sim.add_node("n0")
    sim.add_node("n1", seeds=["n0"])
    sim.run_for(5.0)
    steps = []
    loop = sim.nodes["n1"].loop
    original = loop.step
    loop.step = lambda now, inbound: (steps.append((now, len(inbound))), original(now, inbound))
    sim.stall("n1", 3.0)
    resume = sim.now + 3.0
    sim.run_for(3.5)
    assert all(now >= resume for now, _ in steps)
    assert steps[0][0] == resume and steps[0][1] >= 3  # pings, syncs... waited for it
    assert sim.converged()


def test_the_loop_ticks_the_core_only_when_a_deadline_is_due():
    core = MeshCore("me", "10.0.0.1:1", 0.0, random.Random(1), seeds=["10.0.0.2:1"])
    loop = AgentLoop(core, _Recorder(), 0.0)
    ticks = []
    original = core.tick
    core.tick = lambda now: (ticks.append(now), original(now))[1]
    loop.step(0.0, [])  # joining: the first push to the seed is due now
    assert ticks == [0.0] and loop.transport.sent
    due = core.next_deadline()
    assert due > 0.0 and loop.wakeup_at() == min(due, SNAPSHOT_REFRESH_S)
    loop.step(due / 2, [])  # nothing due yet
    assert ticks == [0.0]
    loop.step(due, [])
    assert ticks == [0.0, due]


def test_a_change_published_between_a_readers_look_and_its_wait_is_not_missed():
    """A reader reads view_version, then the view; the loop publishes a change before the
    reader waits: waiting with `seen` returns at once, without it the change is missed."""
    loop = AgentLoop(MeshCore("me", "10.0.0.1:1", 0.0, random.Random(1)), _Recorder(), 0.0)
    seen = loop.view_version
    assert [m.name for m in loop.snapshot()[0]] == ["me"]
    assert loop.wait_for_change(0.0, seen) is False  # nothing changed since the look
    loop.advertise({"state": "receiving"})
    loop.step(0.01, [])  # published before anyone waits
    assert loop.view_version != seen
    assert loop.wait_for_change(0.0, seen) is True
    assert loop.wait_for_change(0.01) is False  # the old wait: the notification is gone
    assert loop.snapshot()[1].meta["state"] == "receiving"
