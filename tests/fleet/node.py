"""One fleet "host": the root source or a client (optionally relaying), in its own process.

    python -m tests.fleet.node '{"role": "client", "name": "c3", "dir": ..., "waves": [...]}'

A process lives through several waves (so the bench pays process start-up once).
Which client attaches where comes from the real gossip mesh, through the code path a
vLLM rank uses (loader.distribution.discovery.MeshPresence, loader.distribution.upstream_choice): every wave is
a mesh of its own, seeded by the root's agent for that wave, and a model of its own
(`wave_fingerprint`). The root joins every wave's mesh at start; a client joins a
wave's mesh when it reaches that wave and leaves once the wave is over.

Wave `w` has its own directory `dir/w`: `<name>.joined` (the client sees every node
of the wave alive and the root as a source), `go` (its clients start together),
`<name>.result.json`, `stop` (relays of that wave stop serving, every node leaves
its mesh) and `<name>.left` (it has).
`dir/<name>.armed` says a node is ready, `dir/stop` ends the process. Config keys:
role, name, dir, host, size_mib, bucket_mb, secret_file (the fleet's cluster secret: gossip
and transfers are authenticated), gossip ({wave id: {"bind", "seeds"}}),
waves ([{"id", "mode": "serial"|"concurrent"|"chained", "capacity", "clients",
optional "model" (share another wave's fingerprint), optional "victim" and
"die_after_forwarded" (that client dies, SIGKILL, once it forwarded that many buckets in
this wave; it writes `<name>.killed.json` first)}]); test knobs: bucket_delay_s,
corrupt_bucket (source), corrupt_after_forwarding (source: hold the corrupt bucket, at
most 5 s, until that client forwarded its first bucket: it writes `<name>.forwarding`),
die_after_forwarded (every chained wave), suspect_s (client: how long an upstream that
failed is skipped) and after_receiving
(client: start fetching once that instance shows as receiving in the gossip table).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import threading
import time
import traceback
from pathlib import Path

from loader.config import MeshConfig, TransferSettings
from loader.distribution.discovery import MeshPresence
from loader.distribution.peer_record import PeerRecord, RankIdentity, TransferState
from loader.distribution.reattach import ReattachPolicy
from loader.distribution.relay import relay_server
from loader.distribution.upstream_choice import fetch_with_reattach
from loader.transfer.checksum import algorithm_for_device, warm_up_in_background
from loader.transfer.client import FetchOutcome, FetchRequest, fetch_from_sources
from loader.transfer.protocol import is_retryable
from loader.transfer.server import WeightServer
from mesh.security import load_cluster_keys
from tests.fleet.checkpoint import content_digest, make_empty, make_reference
from tests.fleet.faults import CrashingRelay, FaultySource
from tests.support.observers import ObserverFanout, ProgressRecorder

FINGERPRINT = "f1ee7" * 12 + "0000"
ROOT = "source"
MODEL = "fleet-synthetic"
_POLL_S = 0.005  # waits that start a measured interval (go, a corrupt source's marker)
# waits that gate no figure (a wave's or the fleet's stop): polled slowly, so that idle
# nodes do not take cores from the ones a wave is measuring
_IDLE_POLL_S = 0.1
_WATCH_WAKE_S = 0.1  # the table watcher's longest wait for a view change (to see stop)
_CONVERGE_POLL_S = 0.01
_HOLD_CORRUPT_S = 5.0  # below the tests' bucket timeout: the held bucket still arrives


def settings_for(cfg: dict, capacity: int) -> TransferSettings:
    return TransferSettings(
        connect_timeout_s=2.0,
        handshake_timeout_s=5.0,
        pg_setup_timeout_s=20.0,
        bucket_timeout_s=cfg.get("bucket_timeout_s", 20.0),
        bucket_mb=cfg.get("bucket_mb", 4),
        max_concurrent_clients=capacity,
        progress_interval_s=3600.0,
        advertise_host=cfg["host"],
    )


def wait_for(path: Path, deadline_s: float, poll_s: float = _POLL_S) -> bool:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if path.exists():
            return True
        time.sleep(poll_s)
    return False


def cluster_keys(cfg: dict):
    """CURVE keys from the fleet's secret (derived once per process: mesh.security caches)."""
    return load_cluster_keys(cfg["secret_file"])


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def run_source(cfg: dict, d: Path) -> None:
    """The root: one server per wave (its own fingerprint and capacity) over the same
    tensors, each advertised as complete in that wave's mesh, which starts here (seed)."""
    tensors = make_reference(cfg["size_mib"], cfg.get("seed", 0))
    write_json(d / "reference.json", {"digest": content_digest(tensors)})
    servers: list[WeightServer] = []
    presences: list[MeshPresence] = []
    for wave in cfg["waves"]:
        faults = FaultySource()
        faults.bucket_delay_s = cfg.get("bucket_delay_s", 0.0)
        faults.corrupt_bucket = cfg.get("corrupt_bucket")
        if cfg.get("corrupt_after_forwarding"):
            marker = d / wave["id"] / f"{cfg['corrupt_after_forwarding']}.forwarding"
            faults.hold_corrupt = lambda marker=marker: wait_for(marker, _HOLD_CORRUPT_S)
        server = WeightServer(
            tensors,
            wave_fingerprint(wave),
            0,
            settings_for(cfg, wave["capacity"]),
            keys=cluster_keys(cfg),
            host=cfg["host"],
            strategy=faults,
        )
        server.start()
        server.wait_ready(300)
        servers.append(server)
        presence = join_mesh(cfg, wave)
        presence.announce(server)  # what a loaded instance does: ready, state complete
        presences.append(presence)
    (d / f"{cfg['name']}.armed").write_text("1")
    threading.Thread(target=_leave_when_over, args=(cfg, d, presences), daemon=True).start()
    wait_for(d / "stop", cfg.get("deadline_s", 900), _IDLE_POLL_S)
    for presence in presences:
        presence.stop()
    for server in servers:
        server.stop()


def _leave_when_over(cfg: dict, d: Path, presences: list[MeshPresence]) -> None:
    """The root leaves each wave's mesh once the wave is over (waves run one after the
    other), so that nothing it sees there later (its clients leaving) is counted against
    the next wave."""
    for wave, presence in zip(cfg["waves"], presences, strict=True):
        wd = d / wave["id"]
        if not wait_for(wd / "stop", cfg.get("deadline_s", 900), _IDLE_POLL_S):
            return
        presence.stop()
        (wd / f"{cfg['name']}.left").write_text("1")


def wave_fingerprint(wave: dict) -> str:
    """Each wave is its own model (unless it names another wave's in `model`): rows and
    transfers of different waves never mix, even if a mesh were shared by mistake."""
    model = wave.get("model", wave["id"])
    return hashlib.sha256(f"{FINGERPRINT}:{model}".encode()).hexdigest()


def member_name(node: str) -> str:
    """The gossip name of a node's (rank 0) agent: MeshPresence names it `<name>-r<rank>`."""
    return f"{node}-r0"


def node_name(member: str | None) -> str | None:
    return member[: -len("-r0")] if member and member.endswith("-r0") else member


def join_mesh(cfg: dict, wave: dict) -> MeshPresence:
    """Join the wave's mesh the way a vLLM rank does (loader.distribution.discovery.MeshPresence)."""
    gossip = cfg["gossip"][wave["id"]]
    mesh = MeshConfig(
        seeds=tuple(gossip["seeds"]),
        bind=gossip["bind"],
        secret_file=cfg["secret_file"],
        name=cfg["name"],
        wait_timeout_s=cfg.get("mesh_wait_s", 30.0),
        attach_timeout_s=cfg.get("deadline_s", 900),
    )
    identity = RankIdentity(rank=0, tp=1, pp=1, device="cpu", fingerprint=wave_fingerprint(wave))
    presence = MeshPresence(mesh, identity, cluster_keys(cfg), MODEL)
    presence.start()
    if presence.start_error:
        raise RuntimeError(f"{cfg['name']}: wave {wave['id']}: mesh {presence.start_error}")
    return presence


def alive_members(presence: MeshPresence) -> set[str]:
    return {m.name for m in presence.members() if m.state == "alive"}


def wait_converged(presence: MeshPresence, nodes, deadline_s: float) -> None:
    """Until this agent sees every node of the wave alive and the root as a source."""
    want = {member_name(n) for n in nodes}
    root = member_name(ROOT)
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if want <= alive_members(presence) and any(
            r.name == root for r in presence.upstream_rows()
        ):
            return
        time.sleep(_CONVERGE_POLL_S)
    missing = sorted(want - alive_members(presence))
    raise SystemExit(f"mesh did not converge: missing {missing}")


class TableWatcher:
    """Polls the gossip table and records when each member was first seen receiving, and
    when this agent's own meta first said so (wall clock, comparable across the fleet's
    processes): where the gossip delay of a chain link goes."""

    def __init__(self, presence: MeshPresence) -> None:
        self.presence = presence
        self.first_receiving: dict[str, float] = {}
        self.advertised_receiving: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="table-watcher", daemon=True)

    def start(self) -> TableWatcher:
        self._thread.start()
        return self

    def _run(self) -> None:
        # woken by each view change rather than polling: exact times, and no CPU taken
        # from the relays beside it on a small host
        table = self.presence.upstream_reader()
        while not self._stop.is_set():
            now = time.time()
            for r in table.rows():
                if r.state is TransferState.RECEIVING:
                    self.first_receiving.setdefault(node_name(r.name), now)
            if self.advertised_receiving is None:
                own = next((m for m in self.presence.members() if m.is_self), None)
                record = PeerRecord.from_meta(own.meta) if own is not None else None
                if record is not None and record.state is TransferState.RECEIVING:
                    self.advertised_receiving = now
            table.wait_for_change(_WATCH_WAKE_S)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)


def digest_when_idle(tensors: dict) -> str:
    """content_digest in this thread at SCHED_IDLE: the check of a finished client's
    weights takes no CPU from the relays still forwarding on this host (the wave's
    makespan is theirs); it runs when a core is free, at the latest once they are done."""
    normal = os.sched_getscheduler(0), os.sched_getparam(0)
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    try:
        return content_digest(tensors)
    finally:
        os.sched_setscheduler(0, *normal)


def wait_receiving(presence: MeshPresence, node: str, deadline_s: float) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if any(
            r.name == member_name(node) and r.state is TransferState.RECEIVING
            for r in presence.upstream_rows()
        ):
            return
        time.sleep(_POLL_S)
    raise SystemExit(f"{node} never started receiving")


def root_endpoint(presence: MeshPresence) -> str:
    return next(r.endpoint for r in presence.upstream_rows() if r.name == member_name(ROOT))


def fetch_chained(cfg: dict, presence: MeshPresence, relay: WeightServer, dest, settings, observer):
    """What loader.integration.model_loader does for a rank with a mesh: candidates, then re-attach."""
    found = presence.candidates()
    if not found.endpoints:
        return FetchOutcome(False, None, 0, 0.0, [("mesh", found.reason or "no candidates")])
    request = FetchRequest(relay.fingerprint, dest, 0, settings, cluster_keys(cfg), observer)
    policy = ReattachPolicy(
        deadline_s=cfg.get("deadline_s", 900),
        idle_s=cfg.get("mesh_wait_s", 30.0),
        suspect_s=cfg.get("suspect_s", ReattachPolicy.suspect_s),
    )
    table = presence.upstream_reader()
    return fetch_with_reattach(
        table.rows, relay.endpoint, request, policy, table.wait_for_change, table.waiting
    )


def fetch_root(cfg: dict, presence: MeshPresence, fingerprint: str, dest, settings, recorder):
    """Straight to the root; a busy root is asked again (Netloader's clients queue)."""
    root = root_endpoint(presence)
    deadline = cfg.get("deadline_s", 900)
    started = time.monotonic()
    kept = []
    while True:
        outcome = fetch_from_sources(
            [root], fingerprint, dest, 0, settings, keys=cluster_keys(cfg), observer=recorder
        )
        if outcome.ok or not all(is_retryable(why) for _, why in outcome.failures):
            break
        if time.monotonic() - started > deadline:
            break
        kept += [f for f in outcome.failures if not f[1].startswith("busy:")]
        time.sleep(0.02)
    outcome.failures[:0] = kept
    return outcome


def run_wave(cfg: dict, wave: dict, d: Path, dest: dict) -> None:  # long: one wave's script, step by step
    name, mode, deadline = cfg["name"], wave["mode"], cfg.get("deadline_s", 900)
    wd = d / wave["id"]
    fingerprint = wave_fingerprint(wave)
    for t in dest.values():
        t.zero_()
    settings = settings_for(cfg, 1)
    recorder = ProgressRecorder()
    relay = None
    presence = join_mesh(cfg, wave)
    if mode == "chained":  # every instance relays from the start, like a vLLM rank
        crashing = CrashingRelay()
        crashing.die_after_forwarded = cfg.get("die_after_forwarded")
        crashing.on_first_forward = lambda: (wd / f"{name}.forwarding").write_text("1")
        if wave.get("victim") == name:
            crashing.die_after_forwarded = wave["die_after_forwarded"]
            crashing.on_die = lambda: write_json(
                wd / f"{name}.killed.json", {"time": time.time(), "upstream": relay.upstream}
            )
        relay = relay_server(
            dest, fingerprint, 0, settings, crashing, keys=cluster_keys(cfg), host=cfg["host"]
        )
        relay.start()
        presence.publish(relay)  # state "attaching": not a source until receiving
    wait_converged(presence, [ROOT, *wave["clients"]], deadline)
    (wd / f"{name}.joined").write_text("1")
    watcher = TableWatcher(presence).start()
    if not wait_for(wd / "go", deadline):
        raise SystemExit(f"{name}: no go signal for wave {wave['id']}")
    go_seen = time.time()
    if cfg.get("after_receiving"):  # tests: attach only once that instance can relay
        wait_receiving(presence, cfg["after_receiving"], deadline)
    started = time.time()
    if mode == "chained":
        observer = ObserverFanout(relay.strategy, recorder)
        outcome = fetch_chained(cfg, presence, relay, dest, settings, observer)
        upstream = relay.upstream  # the endpoint that served the successful attempt
        rows = presence.upstream_rows()
        names = {r.endpoint: node_name(r.name) for r in rows}
        upstream = names.get(upstream, upstream)
    else:
        outcome = fetch_root(cfg, presence, fingerprint, dest, settings, recorder)
        upstream = ROOT
    ended = time.time()
    if relay is not None and outcome.ok:
        relay.strategy.fetch_succeeded()
        presence.announce(relay)
    watcher.stop()
    reference = json.loads((d / "reference.json").read_text())["digest"]
    write_json(
        wd / f"{name}.result.json",
        {
            "name": name,
            "mode": mode,
            "ok": outcome.ok,
            "peer": outcome.peer,
            "verified": outcome.ok and digest_when_idle(dest) == reference,
            "failures": outcome.failures,
            "go_seen": go_seen,
            "start": started,
            "end": ended,
            "seconds": ended - started,
            "bytes": outcome.bytes,
            "resumed_bytes": outcome.resumed_bytes,
            "handshake_s": outcome.handshake_s,
            "setup_s": outcome.setup_s,
            "refusals": outcome.refusals,
            "samples": recorder.samples,
            "events": recorder.events,
            "forwarded": relay.strategy.forwarded_indices if relay is not None else [],
            "upstream": upstream,
            "first_seen_receiving": watcher.first_receiving,
            "advertised_receiving": watcher.advertised_receiving,
        },
    )
    if relay is not None:
        wait_for(wd / "stop", deadline, _IDLE_POLL_S)
    presence.stop()
    if relay is not None:
        relay.stop()
    (wd / f"{name}.left").write_text("1")


def run_client(cfg: dict, d: Path) -> None:
    # as the vLLM loader does: the checksum kernel is prepared while the model is built
    # (here: ready before the node reports armed, as when the build takes longer)
    hash_ready = warm_up_in_background(algorithm_for_device("cpu"))
    dest = make_empty(cfg["size_mib"])
    hash_ready.join()
    (d / f"{cfg['name']}.armed").write_text("1")
    for wave in cfg["waves"]:
        if cfg["name"] in wave["clients"]:
            run_wave(cfg, wave, d, dest)
    wait_for(d / "stop", cfg.get("deadline_s", 900), _IDLE_POLL_S)


def main() -> None:
    run(json.loads(sys.argv[1]))


def run(cfg: dict) -> None:
    """Run the node described by `cfg`, then exit the process (never returns)."""
    logging.basicConfig(
        level=cfg.get("log_level", "WARNING"),
        format=f"%(created).3f {cfg['name']} %(levelname)s %(name)s: %(message)s",
    )
    # member state changes ("member c3-r0 is suspect"): the harness counts suspicions
    logging.getLogger("mesh.agent").setLevel(min(logging.INFO, logging.getLogger().level))
    d = Path(cfg["dir"])
    code = 0
    try:
        if cfg["role"] == "source":
            run_source(cfg, d)
        else:
            run_client(cfg, d)
    except BaseException:
        traceback.print_exc()
        code = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown: gloo/zmq threads can stall it


if __name__ == "__main__":
    main()
