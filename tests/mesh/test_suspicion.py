"""Lifeguard suspicion: timeout bounds and the cap on independent confirmations."""

import random

import pytest

from mesh.config import ProtocolConfig
from mesh.core import MeshCore
from mesh.entries import ALIVE, SUSPECT, Entry
from mesh.suspicion import Suspicion, suspicion_bounds


def test_timeout_shrinks_from_high_to_low_over_k_confirmations_then_stops_counting():
    s = Suspicion(0, 10.0, low_s=2.0, high_s=12.0, k=3, accusers={"a"})
    assert s.deadline == pytest.approx(22.0)
    assert not s.confirm("a")  # the first accuser again
    deadlines = []
    for accuser in "bcd":
        assert s.confirm(accuser)
        deadlines.append(s.deadline)
    assert deadlines == sorted(deadlines, reverse=True) and deadlines[-1] == pytest.approx(12.0)
    for accuser in "efgh":
        assert not s.confirm(accuser)
    assert s.accusers == {"a", "b", "c", "d"} and s.confirmations == 3
    assert s.deadline == pytest.approx(12.0)


def test_without_confirmations_wanted_none_are_counted():
    s = Suspicion(0, 0.0, low_s=1.0, high_s=1.0, k=0, accusers={"a"})
    assert not s.confirm("b") and s.accusers == {"a"} and s.deadline == 1.0


def test_bounds_follow_cluster_size_and_lifeguard():
    config = ProtocolConfig()
    low, high, k = suspicion_bounds(config, 100)
    assert low == pytest.approx(2 * config.suspicion_mult * config.probe_interval_s)
    assert high == pytest.approx(config.suspicion_max_mult * low) and k == config.suspicion_confirmations
    assert suspicion_bounds(config, 3)[2] == 0  # too few members to ever confirm
    assert suspicion_bounds(ProtocolConfig(lifeguard=False), 100) == (low, low, 0)


def test_core_caps_confirmations_and_stops_regossiping_them():
    core = MeshCore("me", "10.0.0.1:7946", 0.0, random.Random(1))
    for i in range(99):
        core._apply(0.0, Entry(f"m{i}", f"10.0.1.{i}:7946", 0, ALIVE), gossip=False)
    k = core.config.suspicion_confirmations
    core._apply(10.0, Entry("m1", "10.0.1.1:7946", 0, SUSPECT, accuser="a0"), gossip=True)
    for i in range(1, k + 1):
        core.rumors.pop("m1", None)
        core._apply(11.0, Entry("m1", "10.0.1.1:7946", 0, SUSPECT, accuser=f"a{i}"), gossip=True)
        assert "m1" in core.rumors  # a counted confirmation is gossiped on
    suspicion = core.suspicions["m1"]
    deadline = suspicion.deadline
    low, _, _ = suspicion_bounds(core.config, core.alive_count)
    assert deadline == pytest.approx(10.0 + low)
    for i in range(k + 1, 200):  # e.g. forged accuser names
        core.rumors.pop("m1", None)
        core._apply(12.0, Entry("m1", "10.0.1.1:7946", 0, SUSPECT, accuser=f"a{i}"), gossip=True)
        assert "m1" not in core.rumors
    core._accuse(12.0, "m1")  # our own failed probe, after k others: not re-gossiped either
    assert "m1" not in core.rumors
    assert len(suspicion.accusers) == k + 1 and suspicion.deadline == deadline
