"""The coordinator-free attach rule: pure ordering over (untrusted) gossip rows."""

from types import MappingProxyType

from loader.distribution.peer_record import RankIdentity
from loader.distribution.ranking import rank_upstreams, upstream_table
from loader.distribution.relay import NOT_RECEIVING
from loader.transfer.protocol import is_retryable
from mesh.member import Member

IDENTITY = RankIdentity(rank=0, tp=1, pp=1, device="cpu", fingerprint="f" * 64)


def row(name, state="receiving", load=0, capacity=1, progress=0.0, upstream=None, rtt=None,
        **extra):
    """A member advertising this rank's key and the given transfer status."""
    meta = {
        "fingerprint": IDENTITY.fingerprint, "tp": 1, "pp": 1, "rank": 0,
        "ready": state == "complete",
        "endpoint": f"{name}:1",
        "state": state,
        "load": load,
        "capacity": capacity,
        "progress": progress,
        "upstream": upstream,
        **extra,
    }
    return Member(name, "10.0.0.2:7946", "alive", 0, MappingProxyType(meta), rtt)


def ranked(members, self_endpoint, zone=None):
    return rank_upstreams(upstream_table(members, IDENTITY), self_endpoint, zone)


def test_least_loaded_first_and_full_ones_last():
    rows = [
        row("root", "complete", load=1),
        row("a", load=1, progress=0.8, upstream="root:1"),
        row("b", load=0, progress=0.5, upstream="a:1"),
    ]
    assert ranked(rows, "me:1") == ["b:1", "root:1", "a:1"]


def test_complete_before_receiving_then_further_ahead_then_name():
    rows = [
        row("r2", progress=0.2),
        row("r9", progress=0.9),
        row("done", "complete", progress=1.0),
        row("r9b", progress=0.9),
    ]
    assert ranked(rows, "me:1") == ["done:1", "r9:1", "r9b:1", "r2:1"]


def test_never_self_never_our_own_downstream_never_attaching():
    rows = [row("me"), row("child", upstream="me:1"), row("new", state="attaching"), row("ok")]
    assert ranked(rows, "me:1") == ["ok:1"]


def test_nearest_zone_before_less_loaded():
    rows = [row("far", zone="b"), row("near", load=1, capacity=2, zone="a")]
    assert ranked(rows, "me:1", zone="a") == ["near:1", "far:1"]


def test_rtt_within_a_factor_of_two_counts_as_equally_near():
    rows = [
        row("far", rtt=0.040),
        row("near-busy", load=1, capacity=2, rtt=0.0021),
        row("near-idle", rtt=0.0035),
        row("unmeasured"),
    ]
    assert ranked(rows, "me:1") == ["near-idle:1", "near-busy:1", "far:1", "unmeasured:1"]


def test_malformed_rows_are_skipped():
    rows = [
        Member("x", "10.0.0.3:7946", "alive", 0, MappingProxyType({"name": "x"})),
        row("bad-load", load="many"),
        row("bad-state", state=["receiving"]),
        "not a row",
        row("good"),
    ]
    assert ranked([r for r in rows if isinstance(r, Member)], "me") == ["good:1"]


def test_retryable_reasons():
    assert is_retryable("busy: source busy (1 transfers running)")
    assert is_retryable(f"refused: {NOT_RECEIVING}")
    assert not is_retryable("checksum mismatch in bucket 3 (a)")
    assert not is_retryable("connection refused")
