"""Fleet behaviour with real processes on 127.0.0.1 (no namespaces in the test suite).

Each test runs a root source and a few clients (tests.fleet.node, forked from one
fork server), which find each other through a real gossip mesh per wave. The source
is slowed by a fixed delay per bucket so that a transfer spans long enough to attach,
kill or corrupt mid-way; nothing here measures time.
"""

import threading

import pytest

from loader.transfer.client import fetch_from_sources
from mesh.security import load_cluster_keys
from tests.fleet.checkpoint import content_digest, make_empty, make_reference
from tests.fleet.harness import Fleet
from tests.fleet.netns import LoopbackNetwork
from tests.fleet.node import ROOT, settings_for, wave_fingerprint

pytestmark = [pytest.mark.loopback, pytest.mark.timeout(240)]

SIZE_MIB = 16  # 2 layers: 8 direct 2-MiB buckets + small packed ones
BASE = {"size_mib": SIZE_MIB, "bucket_mb": 4, "bucket_timeout_s": 10.0, "deadline_s": 120}


def chained(wave_id, clients):
    return {"id": wave_id, "mode": "chained", "capacity": 1, "clients": clients}


def transfers_after_attaching(result):
    """The kinds of transfer event from the first start on ("start", "failed"; refusals
    before attaching count as failed attempts too)."""
    kinds = [kind for _, kind, _ in result["events"]]
    return kinds[kinds.index("start"):]


def test_concurrency_limit_sends_the_extra_client_to_the_next_source():
    # two sources of the same model (two waves sharing a fingerprint), read from gossip
    limited = {"id": "limited", "mode": "concurrent", "capacity": 2, "clients": []}
    spare = {"id": "spare", "model": "limited", "mode": "concurrent", "capacity": 8, "clients": []}
    fingerprint = wave_fingerprint(limited)
    with Fleet(LoopbackNetwork(1), {**BASE, "bucket_delay_s": 0.3}, [limited, spare]) as fleet:
        fleet.start(0, ROOT, "source")
        fleet.wait_armed([ROOT])
        first = fleet.wait_row("limited", ROOT, lambda r: True, 60)["endpoint"]
        second = fleet.wait_row("spare", ROOT, lambda r: True, 60)["endpoint"]
        settings = settings_for({"host": "127.0.0.1", "bucket_mb": 4}, 1)
        keys = load_cluster_keys(fleet.secret_file)
        outcomes, dests = {}, {}

        def client(i):
            dests[i] = make_empty(SIZE_MIB)
            outcomes[i] = fetch_from_sources(
                [first, second], fingerprint, dests[i], 0, settings, keys=keys
            )

        threads = [threading.Thread(target=client, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        fleet.wait_row("limited", ROOT, lambda r: r["load"] == 2, 60)  # both transferring
        client(2)  # the third: over the limit
        for t in threads:
            t.join(120)
    reference = content_digest(make_reference(SIZE_MIB))
    assert outcomes[2].ok and outcomes[2].peer == second
    assert [(s, why.split(":")[0]) for s, why in outcomes[2].failures] == [(first, "busy")]
    for i in (0, 1):
        assert outcomes[i].ok and outcomes[i].peer == first and outcomes[i].failures == []
    assert all(content_digest(dests[i]) == reference for i in range(3))


def test_killed_chain_link_downstream_finishes_elsewhere_bit_identical():
    # source -> c1 -> c2 -> c3; c1 dies after forwarding 3 buckets to c2
    with Fleet(
        LoopbackNetwork(4), {**BASE, "bucket_delay_s": 0.15}, [chained("w", ["c1", "c2", "c3"])]
    ) as fleet:
        fleet.start(0, ROOT, "source")
        fleet.start(1, "c1", "client", die_after_forwarded=3)
        fleet.start(2, "c2", "client", after_receiving="c1")
        fleet.start(3, "c3", "client", after_receiving="c2")
        fleet.wait_armed([ROOT, "c1", "c2", "c3"])
        fleet.go("w")
        results = fleet.wait_results("w", ["c2", "c3"], 120)
        fleet.end_wave("w")
        fleet.procs["c1"].join(10)
        assert fleet.procs["c1"].exitcode == -9  # the hop really died (SIGKILL)
    c1_endpoint_failures = [f for f in results["c2"]["failures"] if "busy" not in f[1]]
    assert c1_endpoint_failures, results["c2"]  # c2 lost its upstream mid-transfer
    for name in ("c2", "c3"):
        r = results[name]
        assert r["ok"] and r["verified"], r  # bit-identical to the source's tensors
    # c2 re-attached past the dead hop to the root (c3 receives from it: not a candidate);
    # whatever it had verified from c1 was not sent again (c1 may die before c2 verified
    # anything, the pipeline is that short, so resumption itself is tested in tests/transfer)
    assert results["c2"]["upstream"] == ROOT
    assert results["c2"]["resumed_bytes"] < results["c2"]["bytes"], results["c2"]
    # c3 never noticed: its session with c2 went on across c2's failover
    assert results["c3"]["upstream"] == "c2"
    assert transfers_after_attaching(results["c3"]) == ["start"], results["c3"]["events"]


def test_relay_never_forwards_a_bucket_that_failed_verification():
    corrupt = 5
    # the corrupt bucket is held until c1 forwards to c2: c2 is attached when it comes
    # c1 asks the root again after 1 s (the fault is transient), well within c2's patience
    # for an orphaned relay (relay_failover_s)
    cfg = {
        **BASE,
        "bucket_delay_s": 0.2,
        "corrupt_bucket": corrupt,
        "corrupt_after_forwarding": "c1",
        "suspect_s": 1.0,
    }
    with Fleet(LoopbackNetwork(3), cfg, [chained("w", ["c1", "c2"])]) as fleet:
        fleet.start(0, ROOT, "source")
        fleet.start(1, "c1", "client")
        fleet.start(2, "c2", "client", after_receiving="c1")
        fleet.wait_armed([ROOT, "c1", "c2"])
        fleet.go("w")
        results = fleet.wait_results("w", ["c1", "c2"], 120)
        fleet.end_wave("w")
    c1, c2 = results["c1"], results["c2"]
    assert any(f"checksum mismatch in bucket {corrupt}" in why for _, why in c1["failures"]), c1
    # while c1 received from the corrupting attempt (its attempt 0), it forwarded only
    # buckets verified before the corrupt one
    first_attempt = [index for attempt, index in c1["forwarded"] if attempt == 0]
    assert first_attempt and max(first_attempt) < corrupt
    # the next attempt resumed past the verified buckets, so c1 kept c2's session and
    # forwarded the corrupt bucket's index only once it was received again, correct
    assert corrupt in [index for attempt, index in c1["forwarded"] if attempt == 1], c1["forwarded"]
    # c2 never saw a bad bucket, nor a failure: one transfer, from c1, never cut off
    assert transfers_after_attaching(c2) == ["start"], c2["events"]
    assert c2["upstream"] == "c1"
    assert not any("checksum mismatch" in why for _, why in c2["failures"]), c2["failures"]
    assert c1["ok"] and c1["verified"] and c2["ok"] and c2["verified"]
