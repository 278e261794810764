"""Source selection: never an incompatible member; nearest, then least loaded, first."""

from types import MappingProxyType

from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.selection import Member, select_sources

KEY = ("fp-a", 2, 1, 1)


def member(name, addr="10.0.0.2:1", state="alive", rtt=None, is_self=False, **meta):
    base = {"fingerprint": "fp-a", "tp": 2, "pp": 1, "rank": 1, "ready": True, "load": 0}
    base.update(meta)
    return Member(name, addr, state, 0, MappingProxyType(base), rtt, None, is_self)


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
    found = [m.name for m in select_sources(members, *KEY, own=own)]
    assert found == ["ok", "string-ints"]


def test_order_same_host_then_zone_then_rtt_then_load():
    own = member("me", addr="10.0.0.1:1", is_self=True, zone="z1")
    members = [
        member("far-fast", addr="10.0.5.1:1", rtt=0.0002, zone="z2"),
        member("zone-slow", addr="10.0.6.1:1", rtt=0.009, zone="z1"),
        member("zone-fast-busy", addr="10.0.7.1:1", rtt=0.0004, zone="z1", load=5),
        member("zone-fast-idle", addr="10.0.8.1:1", rtt=0.0006, zone="z1", load=1),
        member("same-host", addr="10.0.0.1:2", rtt=0.003, zone="z2"),
        member("unmeasured", addr="10.0.9.1:1", zone="z1"),
    ]
    found = [m.name for m in select_sources(members, *KEY, own=own, zone="z1")]
    assert found == ["same-host", "zone-fast-idle", "zone-fast-busy", "zone-slow", "unmeasured", "far-fast"]


values = st.one_of(st.none(), st.booleans(), st.integers(-2, 5), st.text(max_size=4),
                   st.sampled_from(["fp-a", "fp-b", "2", "1"]), st.floats(allow_nan=True))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alive", "suspect", "dead", "left"]),
                          st.dictionaries(st.sampled_from(["fingerprint", "tp", "pp", "rank", "ready", "load",
                                                           "zone"]), values),
                          st.one_of(st.none(), st.floats(0, 1))), max_size=20))
def test_never_selects_an_incompatible_member(rows):
    members = [Member(f"m{i}", f"10.0.0.{i}:1", state, 0, MappingProxyType(meta), rtt, None, False)
               for i, (state, meta, rtt) in enumerate(rows)]
    for m in select_sources(members, *KEY):
        assert m.state == "alive" and m.meta.get("ready")
        assert m.meta["fingerprint"] == "fp-a"
        assert int(m.meta["tp"]) == 2 and int(m.meta["pp"]) == 1 and int(m.meta["rank"]) == 1
        assert not isinstance(m.meta["rank"], bool)


def with_transfer_state(m: Member, transfer_state: str) -> Member:
    return Member(m.name, m.addr, m.state, 0, MappingProxyType({**m.meta, "state": transfer_state}))


def test_receiving_members_only_when_asked():
    own = member("me", addr="10.0.0.1:1", is_self=True)
    members = [
        own,
        member("complete"),
        with_transfer_state(member("relaying", ready=False), "receiving"),
        with_transfer_state(member("attaching", ready=False), "attaching"),
        with_transfer_state(member("relaying-dead", state="dead", ready=False), "receiving"),
        with_transfer_state(member("relaying-other", ready=False, fingerprint="fp-b"), "receiving"),
    ]
    assert [m.name for m in select_sources(members, *KEY, own=own)] == ["complete"]
    found = [m.name for m in select_sources(members, *KEY, own=own, receiving=True)]
    assert sorted(found) == ["complete", "relaying"]
