"""Hostile gossip: forged incarnations, a name used twice, oversized state (simulator and core)."""

import logging
import random
from collections import Counter

import orjson
import pytest

from mesh.claims import INCARNATION_CEILING, INCARNATION_STEP
from mesh.codec import MAX_INCARNATION, MAX_MESSAGE_BYTES, Decoder, encode
from mesh.core import MeshCore
from mesh.entries import ALIVE, DEAD, LEFT, SUSPECT, Entry
from mesh.messages import Delta, Digest, Gossip, PushState, Sync
from tests.mesh.test_protocol_sim import cluster, everyone_sees, run_until


@pytest.mark.parametrize("state", [SUSPECT, DEAD, LEFT, ALIVE])
@pytest.mark.parametrize("incarnation", [2**53, 2**40])
def test_forged_huge_incarnation_neither_evicts_nor_inflates_a_live_member(state, incarnation):
    sim = cluster(10)
    victim = sim.nodes["n3"]
    sim.advertise("n3", {"gen": 1})
    sim.run_for(5.0)
    entry = {"n": "n3", "a": victim.addr, "i": incarnation, "s": state}
    if state == SUSPECT:
        entry["f"] = "evil"
    for name in list(sim.nodes):  # the victim too: it must not refute to the forged number
        sim.inject(name, orjson.dumps({"v": 1, "t": "gos", "f": "evil", "u": [entry]}))
    sim.run_for(30.0)
    assert everyone_sees(sim, "n3", "alive")
    for node in sim.up_nodes():
        assert node.core.view["n3"].incarnation < INCARNATION_STEP
        assert node.core.view["n3"].meta == {"gen": 1}
    if incarnation > MAX_INCARNATION:
        assert sum(n.decoder.rejected["int"] for n in sim.up_nodes()) == 10  # refused by the codec
    else:
        assert sum(n.core.dropped["incarnation"] for n in sim.up_nodes()) == 10  # by the core


def _core(name="me", addr="10.9.9.9:1"):
    return MeshCore(name, addr, 0.0, random.Random(0))


def test_incarnation_jumps_about_known_members_are_dropped_and_counted():
    core = _core()
    core._apply(0.0, Entry("a", "10.0.0.1:1", 5, ALIVE), gossip=True)
    core._apply(0.0, Entry("a", "10.0.0.1:1", 5 + INCARNATION_STEP + 1, DEAD), gossip=True)
    assert core.view["a"].state == ALIVE and core.dropped["incarnation"] == 1
    core._apply(0.0, Entry("a", "10.0.0.1:1", 5 + INCARNATION_STEP, SUSPECT), gossip=True)
    assert core.view["a"].state == SUSPECT  # a jump within the step is an ordinary claim
    core._apply(0.0, Entry("new", "10.0.0.2:1", INCARNATION_CEILING + 1, ALIVE), gossip=True)
    assert "new" not in core.view and core.dropped["incarnation"] == 2
    core._apply(0.0, Entry("new", "10.0.0.2:1", INCARNATION_CEILING, ALIVE), gossip=True)
    assert core.view["new"].incarnation == INCARNATION_CEILING  # a long-lived member we just met


def test_own_refutation_is_always_encodable():
    core = _core()
    # the first claim about us may be an earlier process's record, however high (a restart)
    core._apply(0.0, Entry("me", "10.9.9.9:1", INCARNATION_CEILING, SUSPECT), gossip=True)
    assert core.incarnation == INCARNATION_CEILING + 1
    # later claims must be credible: no way to push us on towards the codec's limit
    core._apply(0.0, Entry("me", "10.9.9.9:1", INCARNATION_CEILING + 2, DEAD), gossip=True)
    assert core.incarnation == INCARNATION_CEILING + 1 and core.dropped["incarnation"] == 1
    refutation = Gossip("me", (core.view["me"],))
    assert Decoder().decode(encode(refutation)) == refutation
    core.incarnation = MAX_INCARNATION - 1  # unreachable in practice: 2**36 forged claims away
    core.advertise(0.0, {"k": 1})
    core.advertise(0.0, {"k": 2})
    assert core.incarnation == MAX_INCARNATION  # never past what receivers accept
    refutation = Gossip("me", (core.view["me"],))
    assert Decoder().decode(encode(refutation)) == refutation


def test_later_self_claims_far_ahead_are_not_refuted():
    core = _core()
    core._apply(0.0, Entry("me", "10.9.9.9:1", 0, ALIVE), gossip=True)  # our own entry echoed back
    core._apply(0.0, Entry("me", "10.9.9.9:1", 2**40, DEAD), gossip=True)
    assert core.incarnation == 0 and core.view["me"].state == ALIVE


def test_restart_of_a_member_with_a_high_incarnation_is_accepted():
    sim = cluster(8)
    core = sim.nodes["n6"].core
    for step in range(1, 4):  # known everywhere at 3 * 60000, one credible step at a time
        core.incarnation = step * 60000 - 1
        sim.advertise("n6", {"gen": 1})
        sim.run_for(3.0)
    assert all(n.core.view["n6"].incarnation == 180000 for n in sim.up_nodes())
    sim.crash("n6")
    sim.restart("n6", meta={"gen": 2})  # before anyone noticed: still alive at 180000 everywhere
    assert run_until(sim, lambda: all(n.core.view["n6"].meta == {"gen": 2} for n in sim.up_nodes()),
                     10.0) is not None
    assert sim.nodes["n6"].core.incarnation == 180001


def test_same_name_twice_keeps_the_first_address_without_a_refutation_war(caplog):
    caplog.set_level(logging.WARNING, logger="mesh.claims")
    sim = cluster(8)
    first = sim.nodes["n3"]
    sim.add_node("n3", seeds=["n0", "n5"], new_addr=True)
    second = sim.nodes["n3"]
    assert second.addr != first.addr
    sim.run_for(1.0)
    for node, meta in ((first, {"who": "first"}), (second, {"who": "second"})):
        sim.send(node, node.core.advertise(sim.now, meta))  # both publish, as loaders do
        sim.run_for(1.0)
    sim.run_for(60.0)  # without the fix: ~60 incarnations a minute, the address flipping
    others = [n for n in sim.nodes.values() if n.name != "n3"]
    for node in others:
        entry = node.core.view["n3"]
        assert (entry.state, entry.addr, entry.meta) == (ALIVE, first.addr, {"who": "first"})
    assert first.core.incarnation <= 2 and second.core.incarnation <= 4  # no refutation war
    assert first.core.view["n3"].addr == first.addr and second.core.view["n3"].addr == second.addr
    assert sum(n.core.dropped["address conflict"] for n in others) > 0
    conflicts = [r for r in caplog.records if r.name == "mesh.claims" and r.levelno == logging.WARNING]
    assert conflicts
    assert max(Counter((r.args[0], r.args[1], r.args[2]) for r in conflicts).values()) == 1


def test_address_change_is_refused_while_alive_or_suspect_and_taken_once_dead():
    core = _core()
    core._apply(0.0, Entry("a", "10.0.0.1:1", 0, ALIVE), gossip=True)
    core._apply(0.0, Entry("a", "10.0.0.2:1", 1, ALIVE), gossip=True)
    assert core.view["a"].addr == "10.0.0.1:1" and core.view["a"].incarnation == 0
    # a state claim carrying another address changes the state, never the address
    core._apply(0.0, Entry("a", "10.0.0.2:1", 1, SUSPECT, accuser="x"), gossip=True)
    assert (core.view["a"].state, core.view["a"].addr) == (SUSPECT, "10.0.0.1:1")
    core._apply(0.0, Entry("a", "10.0.0.2:1", 2, ALIVE), gossip=True)
    assert core.view["a"].addr == "10.0.0.1:1"
    core._apply(0.0, Entry("a", "10.0.0.1:1", 2, DEAD), gossip=True)
    core._apply(0.0, Entry("a", "10.0.0.2:1", 3, ALIVE), gossip=True)  # restarted elsewhere
    assert (core.view["a"].state, core.view["a"].addr) == (ALIVE, "10.0.0.2:1")
    assert core.dropped["address conflict"] == 2


def test_conflict_warnings_are_bounded():
    core = _core()
    core._apply(0.0, Entry("a", "10.0.0.1:1", 0, ALIVE), gossip=True)
    for port in range(1, 3000):
        core._apply(0.0, Entry("a", f"10.0.0.2:{port}", 1, ALIVE), gossip=True)
    assert core.dropped["address conflict"] == 2999
    assert len(core.claims.conflicts_logged) <= 1024


def test_state_replies_fit_in_one_message():
    core = _core()
    meta = {f"k{i}": "x" * 40 for i in range(9)}  # ~460 bytes per entry: ~1.4 MB of state
    for i in range(3000):
        addr = f"10.1.{i // 256}.{i % 256}:7946"
        core._apply(0.0, Entry(f"member-{i}", addr, 0, ALIVE, meta), gossip=False)
    replies = core.handle(0.0, PushState("peer", "10.2.0.1:1", (), True))
    replies += core.handle(0.0, Sync("peer", "10.2.0.1:1", 1))
    replies += core.handle(0.0, Digest("peer", "10.2.0.1:1", 1, ()))
    wanted = tuple(f"member-{i}" for i in range(3000))
    replies += core.handle(0.0, Delta("peer", "10.2.0.1:1", (), wanted))
    assert sorted(type(msg).__name__ for _, msg in replies) == ["Delta", "Delta", "Digest", "PushState"]
    decoder = Decoder()
    for _, msg in replies:
        data = encode(msg)
        assert len(data) <= MAX_MESSAGE_BYTES
        assert decoder.decode(data) == msg
    push = next(msg for _, msg in replies if isinstance(msg, PushState))
    assert len(push.updates) > 1000  # cut to fit, not emptied
