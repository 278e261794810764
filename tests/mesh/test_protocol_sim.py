"""Protocol behaviour in the deterministic simulator (virtual time: runs in milliseconds)."""

import pytest

from mesh.config import ProtocolConfig
from mesh.entries import DEAD, SUSPECT
from mesh.messages import Ack, Gossip
from mesh.sim import Simulator
from mesh.suspicion import suspicion_bounds


def cluster(n, seed=1, loss=0.0, config=None, on_event=None, settle=10.0):
    sim = Simulator(seed=seed, loss=loss, config=config, on_event=on_event)
    sim.add_node("n0")
    for i in range(1, n):
        sim.add_node(f"n{i}", seeds=[f"n{j}" for j in range(max(0, i - 3), i)])
        sim.run_for(0.01)
    sim.run_for(settle)
    return sim


def run_until(sim, predicate, limit, step=0.1):
    """Advance virtual time until predicate() holds; returns the elapsed virtual time or None."""
    start = sim.now
    while sim.now - start < limit:
        if predicate():
            return sim.now - start
        sim.run_for(step)
    return sim.now - start if predicate() else None


def everyone_sees(sim, subject, state):
    return all(sim.view(n.name).get(subject) == state for n in sim.up_nodes() if n.name != subject)


def test_join_and_convergence():
    sim = cluster(20, settle=0.0)
    assert run_until(sim, sim.converged, 10.0) is not None
    for node in sim.up_nodes():
        assert len(sim.view(node.name)) == 20


def test_converges_under_loss():
    sim = cluster(30, loss=0.1, settle=0.0)
    assert run_until(sim, sim.converged, 10.0) is not None


def test_join_through_unreachable_seed_does_not_block():
    sim = cluster(5)
    sim.add_node("late", seeds=["10.99.99.99:7946", "n2"])
    assert run_until(sim, lambda: everyone_sees(sim, "late", "alive") and sim.converged(), 5.0) is not None


def test_crash_is_detected_everywhere():
    sim = cluster(30, loss=0.05)
    sim.crash("n7")
    assert run_until(sim, lambda: everyone_sees(sim, "n7", "dead"), 30.0) is not None
    assert sim.converged()  # nobody else was declared dead


def test_suspected_member_refutes_and_stays_alive():
    sim = cluster(10)
    before = sim.nodes["n3"].core.incarnation
    # another member accuses n3 through gossip; n3 must refute with a higher incarnation
    accuser = sim.nodes["n5"].core
    accuser._accuse(sim.now, "n3")
    sim.send(sim.nodes["n5"], accuser.tick(sim.now))
    assert sim.view("n5")["n3"] == "suspect"
    assert run_until(sim, lambda: everyone_sees(sim, "n3", "alive") and sim.converged(), 10.0) is not None
    assert sim.nodes["n3"].core.incarnation > before
    sim.run_for(20.0)
    assert everyone_sees(sim, "n3", "alive")


def test_graceful_leave_is_seen_quickly_as_left():
    sim = cluster(30)
    sim.leave("n4")
    elapsed = run_until(sim, lambda: everyone_sees(sim, "n4", "left"), 5.0, step=0.05)
    assert elapsed is not None
    sim.run_for(5.0)
    assert everyone_sees(sim, "n4", "left")  # never turned into dead or alive


def test_restart_under_same_name_is_accepted():
    sim = cluster(15)
    old_incarnation = max(sim.nodes[n].core.view["n6"].incarnation for n in sim.nodes)
    sim.crash("n6")
    assert run_until(sim, lambda: everyone_sees(sim, "n6", "dead"), 30.0) is not None
    sim.restart("n6", meta={"gen": 2})
    assert run_until(sim, sim.converged, 5.0) is not None
    for node in sim.up_nodes():
        entry = node.core.view["n6"]
        assert entry.incarnation > old_incarnation
        assert entry.meta == {"gen": 2}


def test_restart_before_detection_is_accepted():
    sim = cluster(15)
    sim.nodes["n6"].core.advertise(sim.now, {"gen": 1})  # incarnation 1 known everywhere
    sim.run_for(5.0)
    sim.crash("n6")
    sim.restart("n6", meta={"gen": 2})
    assert run_until(sim, lambda: all(
        n.core.view["n6"].meta == {"gen": 2} for n in sim.up_nodes()), 5.0) is not None
    sim.run_for(20.0)
    assert sim.converged()


def test_tombstones_expire():
    config = ProtocolConfig(tombstone_ttl_s=10.0)
    sim = cluster(8, config=config)
    sim.crash("n2")
    assert run_until(sim, lambda: everyone_sees(sim, "n2", "dead"), 30.0) is not None
    assert run_until(sim, lambda: all("n2" not in sim.view(n.name) for n in sim.up_nodes()), 20.0)
    sim.run_for(10.0)
    assert all("n2" not in sim.view(n.name) for n in sim.up_nodes())  # not resurrected


def test_partition_and_heal():
    sim = cluster(20)
    left = [f"n{i}" for i in range(10)]
    right = [f"n{i}" for i in range(10, 20)]
    sim.partition(left, right)
    sim.run_for(30.0)
    assert sim.view("n0")["n15"] == "dead" and sim.view("n15")["n0"] == "dead"
    sim.heal()
    assert run_until(sim, sim.converged, 15.0) is not None


def test_metadata_update_spreads():
    sim = cluster(30, loss=0.05)
    sim.advertise("n9", {"fingerprint": "abc", "tp": 2, "pp": 1, "rank": 1, "ready": True, "load": 3})
    assert run_until(sim, lambda: all(
        n.core.view["n9"].meta.get("load") == 3 for n in sim.up_nodes()), 5.0, step=0.05) is not None


def test_straggler_catches_up_through_anti_entropy():
    sim = cluster(10)
    # n9 misses the whole rumour phase: every message to it is lost for a while
    sim.partition([f"n{i}" for i in range(9)], ["n9"])
    sim.advertise("n1", {"v": 42})
    sim.run_for(0.5)
    sim.heal()
    assert run_until(sim, lambda: sim.nodes["n9"].core.view["n1"].meta == {"v": 42}, 10.0) is not None


def test_cpu_stall_does_not_kill_a_member():
    false_dead = []
    sim = cluster(20, loss=0.01, on_event=lambda t, o, s, old, new, inc: new == DEAD and false_dead.append(s))
    for round_ in range(10):
        sim.stall(f"n{round_ % 20}", 2.0)
        sim.run_for(15.0)
    assert false_dead == []
    assert sim.converged()


def _core(n_members=100, **config):
    import random

    from mesh.core import MeshCore
    from mesh.entries import ALIVE, Entry

    core = MeshCore("me", "10.0.0.1:7946", 0.0, random.Random(1), config=ProtocolConfig(**config))
    for i in range(n_members - 1):
        core._apply(0.0, Entry(f"m{i}", f"10.0.1.{i}:7946", 0, ALIVE), gossip=False)
    return core


def test_lifeguard_suspicion_timeout_shrinks_with_independent_confirmations():
    from mesh.entries import Entry

    core = _core()
    core._apply(10.0, Entry("m1", "10.0.1.1:7946", 0, SUSPECT, accuser="a"), gossip=True)
    low, high, k = suspicion_bounds(core.config, core.alive_count)
    assert k == 2 and high == pytest.approx(6 * low)
    assert core.suspicions["m1"].deadline == pytest.approx(10.0 + high)
    core._apply(11.0, Entry("m1", "10.0.1.1:7946", 0, SUSPECT, accuser="a"), gossip=True)
    assert core.suspicions["m1"].deadline == pytest.approx(10.0 + high)  # same accuser: no change
    core._apply(11.0, Entry("m1", "10.0.1.1:7946", 0, SUSPECT, accuser="b"), gossip=True)
    one = core.suspicions["m1"].deadline
    assert 10.0 + low < one < 10.0 + high
    core._apply(11.0, Entry("m1", "10.0.1.1:7946", 0, SUSPECT, accuser="c"), gossip=True)
    assert core.suspicions["m1"].deadline == pytest.approx(10.0 + low)
    core.tick(10.0 + low + 0.01)
    assert core.view["m1"].state == DEAD


def test_without_lifeguard_suspicion_uses_the_minimum_timeout():
    from mesh.entries import Entry

    core = _core(lifeguard=False)
    core._apply(10.0, Entry("m1", "10.0.1.1:7946", 0, SUSPECT, accuser="a"), gossip=True)
    low, high, _ = suspicion_bounds(core.config, core.alive_count)
    assert core.suspicions["m1"].deadline == pytest.approx(10.0 + low)


def test_local_health_slows_probing_after_unanswered_probes_and_recovers():
    core = _core(n_members=50)
    interval = core.config.probe_interval_s
    # nobody answers (our own network is broken): awareness rises, probes space out
    for _ in range(4):
        core.tick(core.prober.next_probe_at)
        core.tick(core.prober.probe.timeout_at)
        core.tick(core.prober.probe.end_at)
    assert core.awareness.score >= 3
    core.tick(core.prober.next_probe_at)
    probe = core.prober.probe
    assert probe.end_at - probe.start == pytest.approx(interval * (core.awareness.score + 1))
    # answers come back: awareness decays to zero
    for _ in range(core.config.awareness_max):
        core.handle(probe.start, Ack(probe.target, probe.seq))
        core.tick(core.prober.next_probe_at)
        probe = core.prober.probe
    assert core.awareness.score == 0


def test_same_seed_same_run():
    def trace(seed):
        events = []
        sim = cluster(12, seed=seed, loss=0.05,
                      on_event=lambda t, o, s, old, new, inc: events.append((round(t, 9), o, s, new, inc)))
        sim.crash("n4")
        sim.run_for(20.0)
        return events

    assert trace(5) == trace(5)
    assert trace(5) != trace(6)


@pytest.mark.parametrize("n", [2, 3])
def test_tiny_clusters(n):
    sim = cluster(n)
    assert sim.converged()
    sim.crash("n1")
    assert run_until(sim, lambda: sim.view("n0")["n1"] == "dead", 30.0) is not None


def test_metadata_update_is_pushed_at_once_but_at_most_once_per_gossip_interval():
    sim = cluster(10)
    sim.run_for(5.0)
    core = sim.nodes["n3"].core
    first = core.advertise(sim.now, {"state": "receiving"})
    assert 0 < len(first) <= core.config.gossip_fanout
    assert all(isinstance(msg, Gossip) for _, msg in first)
    assert core.advertise(sim.now, {"state": "complete"}) == []  # the next tick carries it
    assert core.advertise(sim.now + 1.01 * core.config.gossip_interval_s, {"state": "x"}) != []


def test_the_anti_entropy_hash_rides_on_the_next_probe_and_a_mismatch_gets_a_digest():
    from mesh.codec import Decoder, encode
    from mesh.messages import Digest, Ping, Sync

    sim = cluster(5)
    core = sim.nodes["n1"].core
    now = core.next_sync_at
    out = core.tick(now)
    assert not [m for _, m in out if isinstance(m, Sync)]  # every member alive: no Sync of its own
    assert core.prober.sync_due
    pings = []
    while core.prober.sync_due and len(pings) < 10:  # (a probe already running ends first)
        pings += [m for _, m in core.tick(core.prober.next_deadline()) if isinstance(m, Ping)]
    ping = pings[-1]
    assert ping.view_hash == core.view_hash and not core.prober.sync_due
    assert all(p.view_hash is None for p in pings[:-1])
    assert Decoder().decode(encode(ping)) == ping
    other = sim.nodes["n2"].core
    stale = Ping(ping.sender, ping.sender_addr, ping.seq, other.name, (), other.view_hash ^ 1)
    replies = other.handle(now, stale)
    assert [type(m) for _, m in replies] == [Ack, Digest]
    assert [type(m) for _, m in other.handle(now, Ping(ping.sender, ping.sender_addr, 7, other.name, (),
                                                         other.view_hash))] == [Ack]
