"""One fleet "host": the root source or a client (optionally relaying), in its own process.

    python -m tests.fleet.node '{"role": "client", "name": "c3", "dir": ..., "waves": [...]}'

A process lives through several waves (so the bench pays process start-up once).
Wave `w` has its own directory `dir/w`: the gossip table rows of that wave
(tests.fleet.table), `go` (its clients start together), `<name>.result.json` and
`stop` (relays of that wave stop serving). `dir/<name>.armed` says a node is ready,
`dir/stop` ends the process. Config keys: role, name, dir, host, size_mib, bucket_mb,
waves ([{"id", "mode": "serial"|"concurrent"|"chained", "capacity", "clients"}]);
test knobs: bucket_delay_s, corrupt_bucket (source), die_after_forwarded and
after_receiving (client: start fetching once that instance is receiving).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
import traceback
from pathlib import Path

from loader.client import fetch_from_sources
from loader.config import TransferSettings
from loader.relay import ObserverFanout, ProgressRecorder, RelayServer
from loader.server import WeightServer
from loader.upstream_choice import fetch_with_reattach, is_retryable
from tests.fleet.checkpoint import content_digest, make_empty, make_reference
from tests.fleet.table import FileTable, RowPublisher

FINGERPRINT = "f1ee7" * 12 + "0000"
ROOT = "source"
_POLL_S = 0.005


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


class FaultySource(WeightServer):
    """Root source with test faults: a delay per bucket (a slow link on loopback) and
    bytes changed in one bucket after its checksum was computed (corruption in flight)."""

    bucket_delay_s = 0.0
    corrupt_bucket: int | None = None
    _corrupted: str | None = None  # tensor changed; restored when the next session starts

    def _before_bucket(self, session, bucket) -> None:
        if self.bucket_delay_s:
            time.sleep(self.bucket_delay_s)
        if bucket.index == 0 and self._corrupted is not None:
            self._tensors[self._corrupted].view(-1)[0] -= 1  # a transient fault: once only
            self._corrupted, self.corrupt_bucket = None, None
        if bucket.index == self.corrupt_bucket and self._corrupted is None:
            self._corrupted = bucket.items[0].name
            self._tensors[self._corrupted].view(-1)[0] += 1


class CrashingRelay(RelayServer):
    """A relay that records what it forwards and, as a test fault, dies (SIGKILL, like a
    crashed host) when about to forward bucket number `die_after_forwarded + 1`."""

    die_after_forwarded: int | None = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.forwarded_indices: list[int] = []

    def _before_bucket(self, session, bucket) -> None:
        super()._before_bucket(session, bucket)
        if (
            self.die_after_forwarded is not None
            and self.buckets_forwarded > self.die_after_forwarded
        ):
            os.kill(os.getpid(), signal.SIGKILL)
        # (upstream attempt number, bucket index): what was forwarded while receiving from whom
        self.forwarded_indices.append([self._session_generation.value, bucket.index])


def wait_for(path: Path, deadline_s: float) -> bool:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if path.exists():
            return True
        time.sleep(_POLL_S)
    return False


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def run_source(cfg: dict, d: Path) -> None:
    tensors = make_reference(cfg["size_mib"], cfg.get("seed", 0))
    write_json(d / "reference.json", {"digest": content_digest(tensors)})
    servers: dict[int, FaultySource] = {}
    rows = []
    for wave in cfg["waves"]:
        capacity = wave["capacity"]
        if capacity not in servers:
            server = FaultySource(
                tensors, FINGERPRINT, 0, settings_for(cfg, capacity), host=cfg["host"]
            )
            server.bucket_delay_s = cfg.get("bucket_delay_s", 0.0)
            server.corrupt_bucket = cfg.get("corrupt_bucket")
            server.start()
            server.wait_ready(300)
            servers[capacity] = server

        def row(server=servers[capacity], capacity=capacity) -> dict:
            return {
                "endpoint": server.endpoint,
                "state": "complete",
                "load": server.active_clients,
                "capacity": capacity,
                "progress": 1.0,
                "upstream": None,
            }

        rows.append(RowPublisher(FileTable(d / wave["id"]), ROOT, row).start())
    (d / f"{cfg['name']}.armed").write_text("1")
    wait_for(d / "stop", cfg.get("deadline_s", 900))
    for publisher in rows:
        publisher.stop()
    for server in servers.values():
        server.stop()


class _UpstreamName:
    """Tracks the table name of the instance we receive from (advertised as `upstream`)."""

    def __init__(self, table: FileTable) -> None:
        self.table, self.name = table, None

    def transfer_started(self, source, ack, plan) -> None:
        self.name = {r.get("endpoint"): r.get("name") for r in self.table.read()}.get(source)

    def bucket_verified(self, source, index) -> None:
        pass

    def attempt_failed(self, source, reason) -> None:
        self.name = None


def _wait_receiving(table: FileTable, name: str, deadline_s: float) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if any(r.get("name") == name and r.get("state") == "receiving" for r in table.read()):
            return
        time.sleep(_POLL_S)
    raise SystemExit(f"{name} never started receiving")


def run_wave(cfg: dict, wave: dict, d: Path, dest: dict) -> None:
    name, mode, deadline = cfg["name"], wave["mode"], cfg.get("deadline_s", 900)
    wd = d / wave["id"]
    table = FileTable(wd)
    for t in dest.values():
        t.zero_()
    settings = settings_for(cfg, 1)
    recorder = ProgressRecorder()
    relay = publisher = None
    if mode == "chained":
        relay = CrashingRelay(dest, FINGERPRINT, 0, settings, host=cfg["host"])
        relay.die_after_forwarded = cfg.get("die_after_forwarded")
        relay.start()
        upstream = _UpstreamName(table)
        publisher = RowPublisher(
            table,
            name,
            lambda: {
                "endpoint": relay.endpoint,
                "state": relay.state,
                "load": relay.active_clients,
                "capacity": relay.settings.max_concurrent_clients,
                "progress": round(relay.verified_fraction, 3),
                "upstream": upstream.name,
            },
        ).start()
        observer = ObserverFanout(upstream, relay, recorder)
    if not wait_for(wd / "go", deadline):
        raise SystemExit(f"{name}: no go signal for wave {wave['id']}")
    if cfg.get("after_receiving"):  # tests: attach only once that instance can relay
        _wait_receiving(table, cfg["after_receiving"], deadline)
    started = time.time()
    if mode == "chained":
        outcome = fetch_with_reattach(
            table.read, name, FINGERPRINT, dest, 0, settings, observer=observer, deadline_s=deadline
        )
    else:  # straight to the root; a busy root is asked again (Netloader's clients queue)
        root = next(r["endpoint"] for r in table.read() if r.get("name") == ROOT)
        kept = []
        while True:
            outcome = fetch_from_sources([root], FINGERPRINT, dest, 0, settings, observer=recorder)
            if outcome.ok or not all(is_retryable(why) for _, why in outcome.failures):
                break
            if time.time() - started > deadline:
                break
            kept += [f for f in outcome.failures if not f[1].startswith("busy:")]
            time.sleep(0.02)
        outcome.failures[:0] = kept
    ended = time.time()
    if relay is not None and outcome.ok:
        relay.fetch_succeeded()
    reference = json.loads((d / "reference.json").read_text())["digest"]
    write_json(
        wd / f"{name}.result.json",
        {
            "name": name,
            "mode": mode,
            "ok": outcome.ok,
            "peer": outcome.peer,
            "verified": outcome.ok and content_digest(dest) == reference,
            "failures": outcome.failures,
            "start": started,
            "end": ended,
            "seconds": ended - started,
            "bytes": outcome.bytes,
            "samples": recorder.samples,
            "events": recorder.events,
            "forwarded": relay.forwarded_indices if relay is not None else [],
            "upstream": upstream.name if relay is not None else ROOT,
        },
    )
    if relay is not None:
        wait_for(wd / "stop", deadline)
        publisher.stop()
        relay.stop()


def run_client(cfg: dict, d: Path) -> None:
    dest = make_empty(cfg["size_mib"])
    (d / f"{cfg['name']}.armed").write_text("1")
    for wave in cfg["waves"]:
        if cfg["name"] in wave["clients"]:
            run_wave(cfg, wave, d, dest)
    wait_for(d / "stop", cfg.get("deadline_s", 900))


def main() -> None:
    run(json.loads(sys.argv[1]))


def run(cfg: dict) -> None:
    """Run the node described by `cfg`, then exit the process (never returns)."""
    logging.basicConfig(
        level=cfg.get("log_level", "WARNING"),
        format=f"%(asctime)s {cfg['name']} %(levelname)s %(name)s: %(message)s",
    )
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
