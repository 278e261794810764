"""Source selection from the mesh view: never an incompatible member; nearest, then least
loaded, first (loader.distribution.ranking over mesh members)."""

import time
from types import MappingProxyType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loader.distribution.peer_record import RankIdentity, TransferState
from loader.distribution.ranking import rank_upstreams, upstream_table
from mesh.api import MeshAgent
from mesh.member import Member
from mesh.security import write_secret_file

IDENTITY = RankIdentity(rank=1, tp=2, pp=1, device="cpu", fingerprint="fp-a")


def member(name, addr="10.0.0.2:1", state="alive", rtt=None, is_self=False, **meta):
    base = {"fingerprint": "fp-a", "tp": 2, "pp": 1, "rank": 1, "ready": True, "load": 0,
            "endpoint": f"{name}:1"}
    base.update(meta)
    return Member(name, addr, state, 0, MappingProxyType(base), rtt, None, is_self)


def select_sources(members, identity=IDENTITY, zone=None) -> list[str]:
    """Names of the members the ranking offers, best first."""
    table = upstream_table(members, identity)
    names = {u.endpoint: u.name for u in table}
    return [names[endpoint] for endpoint in rank_upstreams(table, zone=zone)]


def test_only_alive_ready_exact_matches():
    own = member("me", addr="10.0.0.1:1", is_self=True)
    members = [
        own,
        member("ok"),
        member("suspect", state="suspect"),
        member("dead", state="dead"),
        member("left", state="left"),
        member("not-ready", ready=False),
        member("no-ready-key", ready=None),
        member("other-model", fingerprint="fp-b"),
        member("other-tp", tp=4),
        member("other-pp", pp=2),
        member("other-rank", rank=0),
        member("string-ints", tp="2", pp="1", rank="1"),
        member("bool-rank", rank=True),
    ]
    found = select_sources(members)
    assert found == ["ok", "string-ints"]


def test_order_same_host_then_zone_then_rtt_then_load():
    own = member("me", addr="10.0.0.1:1", is_self=True, zone="z1")
    members = [
        own,
        member("far-fast", addr="10.0.5.1:1", rtt=0.0002, zone="z2"),
        member("zone-slow", addr="10.0.6.1:1", rtt=0.009, zone="z1"),
        member("zone-fast-busy", addr="10.0.7.1:1", rtt=0.0004, zone="z1", load=5),
        member("zone-fast-idle", addr="10.0.8.1:1", rtt=0.0006, zone="z1", load=1),
        member("same-host", addr="10.0.0.1:2", rtt=0.003, zone="z2"),
        member("unmeasured", addr="10.0.9.1:1", zone="z1"),
    ]
    found = select_sources(members, zone="z1")
    assert found == ["same-host", "zone-fast-idle", "zone-fast-busy", "zone-slow", "unmeasured", "far-fast"]


values = st.one_of(st.none(), st.booleans(), st.integers(-2, 5), st.text(max_size=4),
                   st.sampled_from(["fp-a", "fp-b", "2", "1"]), st.floats(allow_nan=True))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alive", "suspect", "dead", "left"]),
                          st.dictionaries(st.sampled_from(["fingerprint", "tp", "pp", "rank", "ready", "load",
                                                           "zone"]), values),
                          st.one_of(st.none(), st.floats(0, 1))), max_size=20))
def test_never_selects_an_incompatible_member(rows):
    members = [Member(f"m{i}", f"10.0.0.{i}:1", state, 0, MappingProxyType({**meta, "endpoint": f"m{i}:1"}),
                      rtt, None, False)
               for i, (state, meta, rtt) in enumerate(rows)]
    by_name = {m.name: m for m in members}
    for m in (by_name[name] for name in select_sources(members)):
        assert m.state == "alive" and m.meta.get("ready")
        assert m.meta["fingerprint"] == "fp-a"
        assert int(m.meta["tp"]) == 2 and int(m.meta["pp"]) == 1 and int(m.meta["rank"]) == 1
        assert not isinstance(m.meta["rank"], bool)


def with_transfer_state(m: Member, transfer_state: str) -> Member:
    return Member(m.name, m.addr, m.state, 0, MappingProxyType({**m.meta, "state": transfer_state}))


def test_receiving_members_only_as_receiving():
    own = member("me", addr="10.0.0.1:1", is_self=True)
    members = [
        own,
        member("complete"),
        with_transfer_state(member("relaying", ready=False), "receiving"),
        with_transfer_state(member("attaching", ready=False), "attaching"),
        with_transfer_state(member("relaying-dead", state="dead", ready=False), "receiving"),
        with_transfer_state(member("relaying-other", ready=False, fingerprint="fp-b"), "receiving"),
    ]
    table = upstream_table(members, IDENTITY)
    assert [u.name for u in table if u.state is TransferState.COMPLETE] == ["complete"]
    found = select_sources(members)
    assert sorted(found) == ["complete", "relaying"]


@pytest.fixture(scope="module")
def secret(tmp_path_factory):
    path = tmp_path_factory.mktemp("mesh") / "cluster.secret"
    write_secret_file(str(path))
    return str(path)


def wait_for(predicate, timeout_s, interval_s=0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return False


@pytest.mark.loopback
def test_in_process_agents_find_nearest_ready_source(secret):
    identity = RankIdentity(rank=0, tp=1, pp=1, device="cpu", fingerprint="fp")
    key = {"fingerprint": "fp", "tp": 1, "pp": 1, "rank": 0}
    with MeshAgent(bind="127.0.0.1:0", name="seed",
                   meta={**key, "ready": True, "load": 3, "endpoint": "seed:1"},
                   secret_file=secret) as seed, \
            MeshAgent(bind="127.0.0.1:0", seeds=[seed.addr], name="idle",
                      meta={**key, "load": 0, "endpoint": "idle:1"}, secret_file=secret) as idle, \
            MeshAgent(bind="127.0.0.1:0", seeds=[seed.addr], name="client", secret_file=secret) as client:
        assert seed.wait_joined(0) and client.wait_joined(10)
        assert {"seed", "client"} <= {m.name for m in client.members()}  # seed's full view arrived
        assert wait_for(lambda: len(client.members()) == 3, 10)
        assert wait_for(lambda: select_sources(client.members(), identity) == ["seed"], 10)
        idle.advertise({"ready": True})
        assert wait_for(lambda: select_sources(client.members(), identity) == ["idle", "seed"], 10)
        other_tp = RankIdentity(rank=0, tp=2, pp=1, device="cpu", fingerprint="fp")
        other_model = RankIdentity(rank=0, tp=1, pp=1, device="cpu", fingerprint="other")
        members = client.members()
        assert select_sources(members, other_tp) == [] and select_sources(members, other_model) == []
        me = next(m for m in client.members() if m.is_self)
        assert me.name == "client" and me.state == "alive"


def test_a_chain_that_leads_back_to_us_through_several_hops_is_never_chosen():
    # me <- a <- b <- c: attaching to c (or b, or a) would close a cycle; d is clean
    from loader.distribution.peer_record import TransferState
    from loader.distribution.ranking import Upstream, rank_upstreams

    def row(name, upstream):
        return Upstream(name, f"{name}:1", TransferState.RECEIVING, progress=0.5, load=0,
                        capacity=1, upstream=upstream, zone=None, rtt_s=None)

    table = [row("a", "me:1"), row("b", "a:1"), row("c", "b:1"), row("d", "root:1"),
             row("e", "e2:1"), row("e2", "e:1")]  # e and e2 in a loop of their own
    assert rank_upstreams(table, "me:1") == ["d:1", "e:1", "e2:1"]  # ties: by name
