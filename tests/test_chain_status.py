"""What a rank gossips about its transfer, how the table is read back, and when a rank
stops re-attaching (no vLLM process, no real mesh)."""

import socket
import time
from types import MappingProxyType, SimpleNamespace

import pytest

from loader.config import MeshConfig, TransferSettings
from loader.distribution import discovery
from loader.distribution.discovery import MeshPresence
from loader.distribution.peer_record import RankIdentity, TransferState
from loader.distribution.ranking import Upstream
from loader.distribution.reattach import Attempt, GiveUp, Reattach, ReattachPolicy, Wait
from loader.distribution.upstream_choice import fetch_with_reattach
from loader.transfer.client import FetchRequest
from mesh.member import Member

IDENTITY = RankIdentity(rank=0, tp=1, pp=1, device="cpu", fingerprint="f" * 64)


class RecordingAgent:
    def __init__(self, found=()):
        self.found = list(found)
        self.advertised: list[dict] = []
        self.notified: list[list[str]] = []
        self.name, self.addr = "me-r0", "127.0.0.1:1"

    def members(self):
        return self.found

    def advertise(self, meta, replace=False, notify=()):
        assert replace, "the record is the whole meta"
        self.advertised.append(dict(meta))
        self.notified.append(list(notify))

    def stop(self, leave=True):
        pass


class FakeRelay:
    def __init__(self):
        self.endpoint = "10.0.0.9:5000"
        self.state, self.verified_fraction, self.upstream = "attaching", 0.0, None
        self.active_clients = 0
        self.settings = TransferSettings(max_concurrent_clients=2)


def presence(agent):
    p = MeshPresence(MeshConfig(seeds=("127.0.0.1:7946",)), IDENTITY, None, "m")
    p._agent = agent
    return p


def member(name, rtt=None, **meta):
    """A member advertising this rank's key (and `meta`)."""
    key = {"fingerprint": IDENTITY.fingerprint, "tp": 1, "pp": 1, "rank": 0}
    return Member(name, "10.0.0.2:7946", "alive", 0, MappingProxyType({**key, **meta}), rtt)


def test_status_follows_the_relay_and_ready_only_when_complete():
    agent, relay = RecordingAgent(), FakeRelay()
    p = presence(agent)
    p._advertise_status(relay)
    relay.state, relay.verified_fraction, relay.upstream = "receiving", 0.34, "10.0.0.1:5000"
    relay.active_clients = 1
    p._advertise_status(relay)
    relay.verified_fraction = 0.29  # same 0.1 step: nothing new to gossip
    p._advertise_status(relay)
    relay.state, relay.verified_fraction = "complete", 1.0
    p._advertise_status(relay)
    first, receiving, complete = agent.advertised
    assert (first["state"], first["ready"], first["endpoint"]) == ("attaching", False, relay.endpoint)
    assert receiving["state"] == "receiving" and receiving["progress"] == 0.3
    assert receiving["upstream"] == "10.0.0.1:5000" and receiving["load"] == 1
    assert receiving["capacity"] == 2 and receiving["ready"] is False
    assert complete["ready"] is True and complete["progress"] == 1.0
    assert "upstream" not in complete  # removes the key from the gossiped meta
    assert complete["fingerprint"] == IDENTITY.fingerprint and complete["role"] == "vllm-worker"


def test_table_rows_from_members_old_peers_without_status_count_as_complete():
    agent = RecordingAgent(
        [
            member("relaying", rtt=0.002, endpoint="r:1", state="receiving", progress=0.5,
                   load=1, capacity=1, upstream="root:1"),
            member("old-peer", endpoint="o:1", ready=True, load=0),
            member("not-serving", endpoint="n:1", state="attaching"),
        ]
    )
    rows = {r.name: r for r in presence(agent).upstream_rows()}
    assert sorted(rows) == ["old-peer", "relaying"]
    assert rows["relaying"].upstream == "root:1" and rows["relaying"].rtt_s == 0.002
    assert rows["old-peer"].state is TransferState.COMPLETE and rows["old-peer"].progress == 1.0


def upstream(name, endpoint=None, load=0):
    """A complete upstream in the table, with capacity 1."""
    return Upstream(name, endpoint or f"{name}:1", TransferState.COMPLETE, progress=1.0, load=load,
                    capacity=1, upstream=None, zone=None, rtt_s=None)


def closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


SETTINGS = TransferSettings(connect_timeout_s=0.5, handshake_timeout_s=0.5)


def test_reattach_gives_up_once_the_table_offers_nothing_usable():
    dead = closed_port()
    row = upstream("dead", endpoint=dead)
    started = time.monotonic()
    outcome = fetch_with_reattach(
        lambda: [row], "10.0.0.9:5000", FetchRequest("f" * 64, {}, 0, SETTINGS),
        ReattachPolicy(idle_s=0.5, deadline_s=60),
    )
    assert not outcome.ok and time.monotonic() - started < 10
    assert outcome.failures[0][0] == dead  # the dead hop, with its reason
    assert "no usable upstream in the table for 0.5s" in outcome.failures[-1][1]


def test_reattach_stops_at_the_deadline_when_upstreams_stay_busy(monkeypatch):
    busy = SimpleNamespace(ok=False, failures=[("a:1", "busy: source busy (1 transfers running)")])
    monkeypatch.setattr(FetchRequest, "from_sources", lambda self, sources: busy)
    row = upstream("a", load=1)
    outcome = fetch_with_reattach(
        lambda: [row], "me:1", FetchRequest("f" * 64, {}, 0, SETTINGS),
        ReattachPolicy(idle_s=0.3, deadline_s=0.6),
    )
    assert not outcome.ok
    assert outcome.failures[-1][0] == "mesh" and "within 0.6s" in outcome.failures[-1][1]
    assert "busy refusals" in outcome.failures[-1][1]


def test_progress_is_gossiped_in_steps():
    relay = FakeRelay()
    relay.state, relay.verified_fraction = "receiving", 0.66
    assert discovery._server_status(relay)["progress"] == 0.7


class FakeClock:
    def __init__(self):
        self.now, self.sleeps = 0.0, []

    def monotonic(self):
        return self.now

    def sleep(self, s):
        self.sleeps.append(s)
        self.now += s


def reattach_delays(monkeypatch, reason, load=0):
    """The gaps between the asks of an upstream that always answers `reason` (the table
    shows it with `load` of capacity 1)."""
    import loader.distribution.upstream_choice as choice

    clock = FakeClock()
    asked = []

    def refuse(self, sources):
        asked.append(clock.now)
        return SimpleNamespace(ok=False, failures=[("a:1", reason)])

    monkeypatch.setattr(FetchRequest, "from_sources", refuse)
    monkeypatch.setattr(choice, "time", clock)
    row = upstream("a", load=load)
    fetch_with_reattach(
        lambda: [row], "me:1", FetchRequest("f" * 64, {}, 0, SETTINGS),
        ReattachPolicy(deadline_s=30, retry_s=0.05),
    )
    return [b - a for a, b in zip(asked, asked[1:], strict=False)]


@pytest.mark.parametrize("load", [0, 1])  # the table lags (shows a free slot) or agrees
def test_busy_refusals_back_off_exponentially_with_jitter(monkeypatch, load):
    delays = reattach_delays(monkeypatch, "busy: source busy (4 transfers running)", load)
    from loader.distribution.reattach import BUSY_BACKOFF_CAP_S

    assert delays[0] <= 0.1 and max(delays) <= BUSY_BACKOFF_CAP_S
    assert delays[5] > 8 * delays[0]  # grows (0.05 * 2**6 before jitter)
    assert max(delays) > BUSY_BACKOFF_CAP_S / 2
    assert len(set(delays)) == len(delays)  # jittered: newcomers do not return in step
    assert len(delays) < 40  # 30 s of busy answers cost tens of retries, not hundreds


def test_during_a_busy_backoff_an_upstream_the_table_shows_with_room_is_asked_at_once():
    """A chain forms one link per new relay: a newcomer refused by full upstreams must
    not sit out its backoff while a new relay with a free slot appears in the table."""
    import random

    from loader.distribution.reattach import Attempt, Reattach, ReattachPolicy, Wait

    state = Reattach(ReattachPolicy(retry_s=0.05), "me:1", 0.0, random.Random(1))
    full = upstream("a", load=1)
    busy = [("a:1", "busy: source busy (1 transfers running)")]
    t = 0.0
    for _ in range(4):  # several busy rounds: the next ask of "a" is 0.4-0.8 s away
        assert isinstance(state.next(t, [full]), Attempt)
        state.record(t, busy, [full])
        t = state._resume_at
    now = t - 0.35
    assert isinstance(state.next(now, [full]), Wait)
    relay = upstream("r", load=0)
    assert state.next(now, [full, relay]) == Attempt(["r:1"])
    # it said busy too, and the table still shows it with the slot free: wait for the backoff
    state.record(now, [("r:1", "busy: source busy (1 transfers running)")], [full, relay])
    assert isinstance(state.next(now + 0.01, [full, relay]), Wait)
    # gossip shows it full, then free again (its downstream left): asked at once
    assert isinstance(state.next(now + 0.02, [full, upstream("r", load=1)]), Wait)
    assert state.next(now + 0.03, [full, relay]) == Attempt(["r:1"])


def test_a_relay_about_to_receive_is_retried_soon(monkeypatch):
    from loader.transfer.protocol import NOT_RECEIVING

    delays = reattach_delays(monkeypatch, f"refused: {NOT_RECEIVING}")
    assert max(delays) <= 0.05


def test_the_status_publisher_follows_the_server_that_replaced_the_relay():
    """After the relay is replaced (disk load replaced parameters, or copies moved to host
    memory), only the new server's endpoint may be gossiped."""
    agent, relay = RecordingAgent(), FakeRelay()
    p = presence(agent)
    p.publish(relay)
    relay.state = "complete"
    server = FakeRelay()
    server.endpoint, server.state, server.retained_bytes = "10.0.0.9:6000", "complete", 123
    p.announce(server)
    time.sleep(8 * discovery.STATUS_REFRESH_S)  # several refreshes of the publisher
    p._stop.set()
    assert agent.advertised[-1]["endpoint"] == server.endpoint
    assert agent.advertised[-1]["retained_bytes"] == 123
    after = agent.advertised[[a["endpoint"] for a in agent.advertised].index(server.endpoint):]
    assert all(a["endpoint"] == server.endpoint for a in after)


def test_reattach_decisions_are_a_function_of_table_clock_and_outcomes():
    """The policy alone, with explicit times: no sockets, no sleeping."""
    import random

    state = Reattach(ReattachPolicy(deadline_s=100, idle_s=20, suspect_s=10, retry_s=0.05),
                     "me:1", 0.0, random.Random(1))
    table = [upstream("a"), upstream("b", load=1)]
    assert state.next(0.0, table) == Attempt(["a:1", "b:1"])
    state.record(0.1, [("a:1", "transfer failed: peer died"), ("b:1", "busy: source busy")])
    wait = state.next(0.1, table)
    assert isinstance(wait, Wait) and 0 < wait.seconds <= 0.05
    assert state.next(0.2, table) == Attempt(["b:1"])  # a is suspect for 10 s
    state.record(0.3, [("b:1", "busy: source busy")])
    assert state.failures == [("a:1", "transfer failed: peer died")] and state.refusals == 2
    assert state.next(10.2, table) == Attempt(["a:1", "b:1"])  # suspicion over
    assert isinstance(state.next(10.3, []), Wait)  # nothing usable: wait, then give up
    assert state.next(30.2, []) == GiveUp("no usable upstream in the table for 20s")


def test_reattach_gives_up_at_the_deadline_even_while_busy_answers_come():
    import random

    state = Reattach(ReattachPolicy(deadline_s=3, retry_s=0.05), "me:1", 0.0, random.Random(2))
    now, asked = 0.0, []
    while True:
        decision = state.next(now, [upstream("a", load=1)])
        if isinstance(decision, GiveUp):
            break
        if isinstance(decision, Attempt):
            asked.append(now)
            state.record(now, [("a:1", "busy: source busy (1 transfers running)")])
        else:
            now += decision.seconds
    assert decision == GiveUp(f"no upstream served us within 3s ({state.refusals} busy refusals)")
    gaps = [b - a for a, b in zip(asked, asked[1:], strict=False)]
    assert gaps[-1] > 8 * gaps[0] and state.busy_rounds == state.refusals


def test_a_candidate_that_began_to_receive_from_us_meanwhile_is_not_tried(monkeypatch):
    # the table offered [a, b]; while the attempt at a failed, b attached to us: trying b
    # now would make a cycle (b waits for our buckets, we for b's)
    me = "10.0.0.9:5000"
    table = [upstream("a"), upstream("b")]
    tried = []

    def from_sources(self, sources):
        tried.extend(sources)
        if sources == ["a:1"]:
            table[1] = Upstream("b", "b:1", TransferState.RECEIVING, progress=0.1, load=0,
                                capacity=1, upstream=me, zone=None, rtt_s=None)
            return SimpleNamespace(ok=False, failures=[("a:1", "transfer failed: reset")])
        return SimpleNamespace(ok=True, failures=[], seconds=0.0)

    monkeypatch.setattr(FetchRequest, "from_sources", from_sources)
    outcome = fetch_with_reattach(
        lambda: list(table), me, FetchRequest("f" * 64, {}, 0, SETTINGS),
        ReattachPolicy(idle_s=0.3, deadline_s=5),
    )
    assert tried == ["a:1"]  # never b, which now receives from us; a is suspect for 10 s
    assert not outcome.ok and outcome.failures[0] == ("a:1", "transfer failed: reset")


def test_a_status_change_is_advertised_at_once_not_at_the_next_look(monkeypatch):
    """The server's on_status_change (set by publish) wakes the publisher: with the
    periodic look ten minutes apart, the change is still gossiped within seconds."""
    monkeypatch.setattr(discovery, "STATUS_REFRESH_S", 600.0)
    agent, relay = RecordingAgent(), FakeRelay()
    p = presence(agent)
    p.publish(relay)
    try:
        relay.state, relay.upstream = "receiving", "10.0.0.1:5000"
        relay.on_status_change()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and agent.advertised[-1]["state"] != "receiving":
            time.sleep(0.01)
        assert agent.advertised[-1]["state"] == "receiving"
    finally:
        p.stop()


def test_a_relay_tells_its_server_when_it_begins_to_receive_fails_and_completes():
    import torch

    from loader.distribution.relay import relay_server
    from loader.transfer.buckets import plan_buckets
    from loader.transfer.manifest import build_manifest

    tensors = {"w": torch.zeros(16)}
    server = relay_server(tensors, "f" * 64, 0, TransferSettings())
    seen = []
    server.on_status_change = lambda: seen.append(server.state)
    relay = server.strategy
    plan = plan_buckets(build_manifest(tensors).specs, 1 << 20)
    ack = SimpleNamespace(checksums=("x",) * len(plan), algorithm="nh", bucket_bytes=1 << 20, skip=frozenset())
    relay.transfer_started("10.0.0.1:5000", ack, plan)
    assert seen == [TransferState.RECEIVING]
    relay.attempt_failed("10.0.0.1:5000", "gone")
    assert seen[-1] == TransferState.ATTACHING
    relay.transfer_started("10.0.0.2:5000", ack, plan)
    relay.fetch_succeeded()
    assert seen[-2:] == [TransferState.RECEIVING, TransferState.COMPLETE]


class VersionedAgent(RecordingAgent):
    """The view's version and waits as MeshAgent has them (no thread: waits return at once
    when the view changed since `seen`, else record that they would block)."""

    def __init__(self, found=()):
        super().__init__(found)
        self.view_version = 0
        self.blocked = 0

    def change(self, found):
        self.found, self.view_version = list(found), self.view_version + 1

    def wait_for_change(self, timeout_s, seen=None):
        if seen is not None and seen != self.view_version:
            return True
        self.blocked += 1
        return False


def test_a_readers_wait_wakes_for_a_change_since_its_own_read_whoever_read_after_it():
    agent = VersionedAgent([member("a", state="attaching")])
    p = presence(agent)
    fetch, watcher = p.upstream_reader(), p.upstream_reader()
    assert fetch.rows() == []  # nobody receiving yet
    agent.change([member("a", state="receiving", endpoint="10.0.0.2:5000")])
    assert [r.name for r in watcher.rows()] == ["a"]  # another thread saw the change
    fetch.wait_for_change(1.0)
    assert agent.blocked == 0  # the fetch had not seen it: it reads again at once
    assert [r.name for r in fetch.rows()] == ["a"]
    fetch.wait_for_change(1.0)
    assert agent.blocked == 1  # nothing new since: it waits


def test_a_relay_tells_the_waiting_newcomers_at_once_when_its_slots_change():
    """Newcomers attach to a relay only once they see it receiving: the relay's change is
    sent straight to them (not left to gossip ticks), and so is each change of its load,
    after which a slot the table still showed free would be asked in vain."""
    waiting = [member("a-r0", state="attaching", endpoint="10.0.0.4:5000"),
               member("b-r0", state="attaching", endpoint="10.0.0.3:5000"),
               member("me-r0", state="attaching", endpoint="10.0.0.9:5000")]  # ourselves
    a_meta = waiting[1].meta
    others = [member("done-r0", state="complete", endpoint="10.0.0.5:5000"),
              member("other-shard-r0", state="attaching", endpoint="10.0.0.6:5000", rank=1),
              Member("gone-r0", "10.0.0.7:7946", "dead", 0, a_meta, None)]
    agent, relay = RecordingAgent(found=waiting + others), FakeRelay()
    p = presence(agent)
    p._advertise_status(relay)  # attaching: no slot to offer
    relay.state, relay.verified_fraction = "receiving", 0.01
    p._advertise_status(relay)
    relay.verified_fraction = 0.5  # progress only
    p._advertise_status(relay)
    relay.active_clients = 1  # a downstream took the slot
    p._advertise_status(relay)
    # in turn order (endpoint order: "b" before "a"), ourselves and the rest left out
    assert agent.notified == [[], ["b-r0", "a-r0"], [], ["b-r0", "a-r0"]]


def turns(me="me:1"):
    import random

    return Reattach(ReattachPolicy(retry_s=0.05), me, 0.0, random.Random(1))


def test_newcomers_take_turns_at_free_slots_instead_of_all_asking_the_same_relay():
    waiting = ["a:1", "me:1", "z:1"]  # we are the second in endpoint order
    one_free = [upstream("full", load=1), upstream("r")]
    mine = turns()
    assert isinstance(mine.next(0.0, one_free, waiting), Wait)  # "a:1" asks "r"
    assert turns(me="a:1").next(0.0, one_free, waiting) == Attempt(["r:1"])
    two_free = [*one_free, upstream("s")]
    assert mine.next(0.01, two_free, waiting) == Attempt(["s:1"])  # the second free slot
    # a slot its newcomer did not take within the grace is anyone's
    from loader.distribution.reattach import TURN_GRACE_S

    assert isinstance(mine.next(TURN_GRACE_S - 0.01, one_free, waiting), Wait)
    assert mine.next(TURN_GRACE_S + 0.01, one_free, waiting) == Attempt(["r:1"])
    # one relay with room for two: its second slot is ours
    wide = Upstream("w", "w:1", TransferState.COMPLETE, progress=1.0, load=0, capacity=2,
                    upstream=None, zone=None, rtt_s=None)
    assert turns().next(0.0, [wide], waiting) == Attempt(["w:1"])
    assert isinstance(turns(me="z:1").next(0.0, [wide], waiting), Wait)


def test_without_turns_every_usable_upstream_is_asked_as_before():
    table = [upstream("full", load=1), upstream("r")]
    assert turns().next(0.0, table, ["me:1"]) == Attempt(["r:1", "full:1"])  # alone
    assert turns().next(0.0, table, ["a:1", "b:1"]) == Attempt(["r:1", "full:1"])  # not waiting
    unadvertised = Upstream("old", "old:1", TransferState.COMPLETE, progress=1.0, load=0,
                            capacity=None, upstream=None, zone=None, rtt_s=None)
    assert turns().next(0.0, [unadvertised], ["me:1", "a:1"]) == Attempt(["old:1"])


def test_while_every_upstream_is_full_newcomers_wait_and_ask_only_once_the_table_looks_stuck():
    from loader.distribution.reattach import BUSY_BACKOFF_CAP_S

    full = [upstream("a", load=1), upstream("b", load=1)]
    state = turns()
    waiting = ["me:1", "x:1"]  # first in turn: still no asking of full ones
    t = 0.0
    while t < BUSY_BACKOFF_CAP_S - 0.05:
        assert isinstance(state.next(t, full, waiting), Wait)
        t += 0.05
    assert state.next(BUSY_BACKOFF_CAP_S, full, waiting) == Attempt(["a:1", "b:1"])
    # a slot that comes free starts the count again
    state.next(BUSY_BACKOFF_CAP_S + 0.1, [upstream("a"), full[1]], waiting)
    assert isinstance(state.next(BUSY_BACKOFF_CAP_S + 0.2, full, waiting), Wait)
