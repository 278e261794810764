"""Source planning, the bounded mesh wait, and what a rank serves (no vLLM process needed)."""

import time
from types import MappingProxyType

import pytest
import torch
from torch import nn

from loader.config import MeshConfig, parse_extra_config
from loader.distribution import discovery
from loader.distribution.discovery import MeshPresence, _bind_for_rank
from loader.distribution.peer_record import RankIdentity
from loader.distribution.sources import plan_sources
from loader.integration.model_loader import servable_tensors
from mesh.member import Member

IDENTITY = RankIdentity(rank=1, tp=2, pp=1, device="cpu", fingerprint="f" * 64)


class FakeAgent:
    def __init__(self, found=(), others=0):
        self.found, self.others = list(found), others
        self.name, self.addr = "fake", "127.0.0.1:1"

    def members(self):
        alive = [Member(f"other-{i}", "10.0.0.3:1", "alive", 0) for i in range(self.others)]
        return [Member("fake", self.addr, "alive", 0, is_self=True)] + alive + self.found


def presence_with(agent, **mesh):
    p = MeshPresence(MeshConfig(**{"seeds": ("127.0.0.1:7946",), **mesh}), IDENTITY, None, "m")
    p._agent = agent
    return p


def member(endpoint):
    """A ready member advertising this rank's key, serving on `endpoint`."""
    meta = {"fingerprint": IDENTITY.fingerprint, "tp": 2, "pp": 1, "rank": 1, "ready": True,
            "endpoint": endpoint}
    return Member(endpoint, "10.0.0.2:1", "alive", 0, MappingProxyType(meta))


def test_mesh_candidates_come_before_static_sources_without_duplicates():
    config = parse_extra_config({"SOURCE": [{"device_id": 1, "sources": ["s:1", "m:2"]},
                                            {"device_id": 0, "sources": ["other:1"]}]})
    presence = presence_with(FakeAgent(found=[member("m:2"), member("m:3")]))
    plan = plan_sources(IDENTITY, config, presence)
    assert plan.sources == ["m:2", "m:3", "s:1"]
    assert plan.failures == []


def test_no_fingerprint_means_no_sources_and_says_why():
    identity = RankIdentity(0, 1, 1, "cpu", None, "MODEL: no weight files")
    config = parse_extra_config({"SOURCE": [{"device_id": 0, "sources": ["s:1"]}]})
    plan = plan_sources(identity, config)
    assert plan.sources == []
    assert plan.failures == [("fingerprint", "MODEL: no weight files")]


def test_rank_without_static_entry_reports_it():
    plan = plan_sources(IDENTITY, parse_extra_config({}))
    assert plan.sources == [] and "rank 1" in plan.failures[0][1]


def test_mesh_with_peers_but_no_match_gives_up_after_settling(monkeypatch):
    monkeypatch.setattr(discovery, "SETTLE_S", 0.2)
    monkeypatch.setattr(discovery, "POLL_S", 0.01)
    started = time.monotonic()
    found = presence_with(FakeAgent(others=3), wait_timeout_s=30).candidates()
    assert time.monotonic() - started < 5
    assert found.endpoints == [] and "among 3 alive members" in found.reason


def test_unreachable_mesh_costs_at_most_the_wait_timeout(monkeypatch):
    monkeypatch.setattr(discovery, "POLL_S", 0.01)
    started = time.monotonic()
    found = presence_with(FakeAgent(), wait_timeout_s=0.3).candidates()
    assert 0.3 <= time.monotonic() - started < 5
    assert "no mesh member reachable" in found.reason


def test_first_member_without_seeds_does_not_wait():
    found = presence_with(FakeAgent(), seeds=(), wait_timeout_s=30).candidates()
    assert found.endpoints == [] and "no seeds" in found.reason


def test_agent_that_failed_to_start_reports_it():
    p = presence_with(None)
    p.start_error = "agent did not start: address in use"
    assert p.candidates().reason == "agent did not start: address in use"


@pytest.mark.parametrize("bind,rank,expected", [
    (None, 3, "0.0.0.0:0"), ("10.0.0.1:7946", 0, "10.0.0.1:7946"),
    ("10.0.0.1:7946", 2, "10.0.0.1:7948"), ("127.0.0.1:0", 5, "127.0.0.1:0"),
])
def test_each_rank_binds_its_own_gossip_port(bind, rank, expected):
    assert _bind_for_rank(bind, rank) == expected


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight
        self.empty = nn.Parameter(torch.empty(0))
        self.norm = nn.Parameter(torch.ones(4))


def test_tied_weights_are_served_once_and_empty_params_skipped():
    tensors = servable_tensors(Tied())
    assert sorted(tensors) == ["embed.weight", "norm"]


def test_meta_parameters_make_a_model_unservable():
    with torch.device("meta"):
        model = Tied()
    assert servable_tensors(model) is None


@pytest.mark.parametrize("bind,seeds,rank,expected", [
    ("10.0.0.1:7946", (), 0, []),
    ("10.0.0.1:7946", (), 2, ["10.0.0.1:7946"]),
    ("0.0.0.0:7946", ("s:1",), 1, ["s:1", "127.0.0.1:7946"]),
    ("0.0.0.0:0", ("s:1",), 1, ["s:1"]),
    (None, ("s:1",), 3, ["s:1"]),
])
def test_ranks_above_zero_also_seed_to_their_own_rank_zero(bind, seeds, rank, expected):
    assert discovery._seeds_for_rank(MeshConfig(seeds=seeds, bind=bind), rank) == expected
