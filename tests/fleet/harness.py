"""Run fleet nodes (tests.fleet.node) as processes on a network (netns or loopback).

Host 0 runs the root source, hosts 1..N the clients, each a forked process. The harness starts the
processes, drops the `go`/`stop` files and collects results; which client attaches
where is decided by the clients themselves from the wave's gossip mesh (one mesh per
wave: agent `slot` = wave index on every host, seeded by the root's agent).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from mesh.security import write_secret_file
from tests.fleet import node
from tests.fleet.node import ROOT

_POLL_S = 0.02
# forkserver: torch/vLLM are imported once (in the fork server, which runs no torch
# work and no threads); each node is forked from it and only enters its namespace
_FORK = mp.get_context("forkserver")
_FORK.set_forkserver_preload(["tests.fleet.node"])


def _node_entry(network, host: int, cfg: dict, log_path: str) -> None:
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    network.enter(host)
    node.run(cfg)


_MEMBER_EVENT = re.compile(
    r"^(?P<t>\d+\.\d+) (?P<observer>\S+) INFO mesh\.agent: member (?P<member>\S+) "
    r"is (?P<state>suspect|dead)\b"
)


class FleetError(RuntimeError):
    pass


class Fleet:
    """Processes for one source and some clients sharing a list of waves."""

    def __init__(self, network, base_cfg: dict, waves: list[dict], keep_dir: bool = False):
        self.network = network
        self.base = dict(base_cfg)
        self.waves = waves
        self.keep_dir = keep_dir
        self.dir = Path(tempfile.mkdtemp(prefix="nlm-fleet-"))
        # one cluster secret per fleet: gossip and transfers are authenticated, as in vLLM
        self.secret_file = str(self.dir / "cluster.secret")
        write_secret_file(self.secret_file)
        for wave in waves:
            (self.dir / wave["id"]).mkdir()
        self.procs: dict[str, mp.Process] = {}
        self.root_host = 0
        self._observers: dict = {}

    def gossip(self, host: int) -> dict[str, dict]:
        """Per wave: the bind of `host`'s agent and the seeds (the root's agent)."""
        out = {}
        for slot, wave in enumerate(self.waves):
            bind = self.network.gossip_bind(host, slot)
            root = self.network.gossip_bind(self.root_host, slot)
            out[wave["id"]] = {"bind": bind, "seeds": [] if bind == root else [root]}
        return out

    # ---- processes -------------------------------------------------------------------

    def start(self, host: int, name: str, role: str, **cfg) -> None:
        cfg = {
            **self.base,
            **cfg,
            "role": role,
            "name": name,
            "waves": self.waves,
            "dir": str(self.dir),
            "host": self.network.address(host),
            "gossip": self.gossip(host),
            "secret_file": self.secret_file,
        }
        log_path = str(self.dir / f"{name}.log")
        proc = _FORK.Process(target=_node_entry, args=(self.network, host, cfg, log_path))
        proc.start()
        self.procs[name] = proc

    def wait_armed(self, names, timeout_s: float = 180) -> None:
        self._wait(
            lambda: all((self.dir / f"{n}.armed").exists() for n in names),
            timeout_s,
            f"nodes {list(names)} not armed",
        )

    def wait_joined(self, wave_id: str, names, timeout_s: float = 120) -> None:
        """Until every client of the wave sees all of the wave's nodes in its mesh."""
        self._wait(
            lambda: all((self.dir / wave_id / f"{n}.joined").exists() for n in names),
            timeout_s,
            f"wave {wave_id}: nodes {list(names)} not joined",
        )

    def go(self, wave_id: str) -> float:
        """Start the wave's clients together, once each of them sees all of the wave's
        nodes alive (a client that dies early, e.g. a killed relay, is then already known
        to the others and is seen dying, not waited for); returns when `go` was given."""
        wave = next(w for w in self.waves if w["id"] == wave_id)
        self.wait_joined(wave_id, wave["clients"])
        (self.dir / wave_id / "go").write_text("1")
        return time.time()

    def wait_results(self, wave_id: str, names, timeout_s: float) -> dict[str, dict]:
        paths = {n: self.dir / wave_id / f"{n}.result.json" for n in names}
        self._wait(
            lambda: all(p.exists() for p in paths.values()),
            timeout_s,
            "clients did not finish: " + ", ".join(sorted(names)),
        )
        return {n: json.loads(p.read_text()) for n, p in paths.items()}

    def end_wave(self, wave_id: str) -> None:
        (self.dir / wave_id / "stop").write_text("1")

    def wait_left(self, wave_id: str, names, timeout_s: float = 60) -> None:
        """Until the nodes `names` have left the wave's mesh (and the root has too)."""
        self._wait(
            lambda: all((self.dir / wave_id / f"{n}.left").exists() for n in [ROOT, *names]),
            timeout_s,
            f"wave {wave_id}: nodes {list(names)} did not leave its mesh",
        )

    def observer(self, wave_id: str):
        """A MeshPresence of this (test) process in the wave's mesh, to read its gossip
        table. Loopback only: the namespaces' addresses are not reachable from here."""
        if self.network.shaped:
            raise FleetError("the harness process cannot reach the namespaces' meshes")
        if wave_id not in self._observers:
            slot = next(i for i, w in enumerate(self.waves) if w["id"] == wave_id)
            seed = self.network.gossip_bind(self.root_host, slot)
            cfg = {
                "name": "observer",
                "gossip": {wave_id: {"bind": "127.0.0.1:0", "seeds": [seed]}},
                "secret_file": self.secret_file,
            }
            self._observers[wave_id] = node.join_mesh(cfg, self.waves[slot])
        return self._observers[wave_id]

    def wait_row(self, wave_id: str, name: str, predicate, timeout_s: float) -> dict:
        """The gossip row of node `name` in the wave, once `predicate(row)` holds."""
        found: dict = {}
        presence = self.observer(wave_id)

        def check() -> bool:
            for row in map(asdict, presence.upstream_rows()):
                if node.node_name(row["name"]) == name and predicate(row):
                    found.update(row)
                    return True
            return False

        self._wait(check, timeout_s, f"row {name!r} never matched")
        return found

    def _wait(self, condition, timeout_s: float, what: str) -> None:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if condition():
                return
            failed = [n for n, p in self.procs.items() if p.exitcode not in (None, 0, -9)]
            if failed:
                raise FleetError(f"{what}; process(es) failed: {failed} (logs in {self.dir})")
            time.sleep(_POLL_S)
        raise FleetError(f"{what} within {timeout_s:g}s (logs in {self.dir})")

    def mesh_events(self, since: float, until: float) -> list[tuple[float, str, str, str]]:
        """(time, observer, member, state) for every member seen suspect or dead between
        `since` and `until`, from the nodes' logs (mesh.agent logs state changes)."""
        events = []
        for name in self.procs:
            path = self.dir / f"{name}.log"
            if not path.exists():
                continue
            for line in path.read_text(errors="replace").splitlines():
                m = _MEMBER_EVENT.match(line)
                if m and since <= float(m["t"]) <= until:
                    events.append((float(m["t"]), m["observer"], m["member"], m["state"]))
        return sorted(events)

    def stop(self, grace_s: float = 15) -> None:
        for presence in self._observers.values():
            presence.stop()
        self._observers.clear()
        (self.dir / "stop").write_text("1")
        end = time.monotonic() + grace_s
        for p in self.procs.values():
            p.join(max(0.1, end - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(5)

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        if not self.keep_dir and exc[0] is None:
            shutil.rmtree(self.dir, ignore_errors=True)


def host_cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all this host's CPUs since boot, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return total - idle, total


def busy_fraction(before: tuple[int, int], after: tuple[int, int]) -> float | None:
    busy, total = after[0] - before[0], after[1] - before[1]
    return busy / total if total > 0 else None


def cpu_pressure_us() -> int | None:
    """Microseconds since boot during which some runnable task of this host waited for a
    CPU (pressure stall information, /proc/pressure/cpu "some"); None without PSI."""
    try:
        first = Path("/proc/pressure/cpu").read_text().split("\n", 1)[0]
        return int(first.rsplit("total=", 1)[1])
    except (OSError, IndexError, ValueError):
        return None


def waiting_fraction(before: int | None, after: int | None, seconds: float) -> float | None:
    if before is None or after is None or seconds <= 0:
        return None
    return (after - before) / 1e6 / seconds


def run_waves(
    network, clients: int, base_cfg: dict, waves: list[dict], timeout_s: float, on_wave=None
) -> dict[str, dict]:
    """Start one source and `clients` clients, run each wave in turn (its clients start
    together), and return per wave: t0, makespan, all_verified, per-client results and,
    host_cpu_busy (the fraction of all CPU time of this host spent busy during the wave),
    host_cpu_waiting (the fraction of the wave during which some runnable task waited for
    a core: what a relay's stalls come from on a small host; None without PSI) and, for
    a wave with a victim, `killed` (when it died and its upstream; None if it lived).
    A killed victim's process is gone: a wave with a victim comes last."""
    names = [f"c{i}" for i in range(1, clients + 1)]
    out: dict[str, dict] = {}
    with Fleet(network, base_cfg, waves) as fleet:
        fleet.start(0, ROOT, "source")
        for i, name in enumerate(names, start=1):
            fleet.start(i, name, "client")
        fleet.wait_armed([ROOT, *names])
        for wave in waves:
            wid = wave["id"]
            fleet.wait_joined(wid, wave["clients"])  # before the CPU figures' start (go waits too)
            cpu_before, pressure_before = host_cpu_times(), cpu_pressure_us()
            t0 = fleet.go(wid)
            victim = wave.get("victim")
            results = fleet.wait_results(wid, [c for c in wave["clients"] if c != victim], timeout_s)
            kill_record = fleet.dir / wid / f"{victim}.killed.json"
            killed = json.loads(kill_record.read_text()) if victim and kill_record.exists() else None
            if victim is not None and killed is None:  # it had no downstream: lived
                results.update(fleet.wait_results(wid, [victim], timeout_s))
            ended = time.time()
            cpu = busy_fraction(cpu_before, host_cpu_times())
            waiting = waiting_fraction(pressure_before, cpu_pressure_us(), ended - t0)
            fleet.end_wave(wid)
            # (before the next wave starts: members leaving this mesh are not its events)
            fleet.wait_left(wid, list(results))  # a killed victim has no result
            # suspicions of anyone but a killed victim are false ones
            suspicions = [
                e for e in fleet.mesh_events(t0, ended)
                if killed is None or node.node_name(e[2]) != victim
            ]
            first_start = min(r["start"] for r in results.values())
            out[wid] = {
                "mode": wave["mode"],
                "t0": first_start,
                "go_latency": first_start - t0,
                # from the first client's start: the go file's latency is not the transfer's
                "makespan": max(r["end"] for r in results.values())
                - min(r["start"] for r in results.values()),
                "all_verified": all(r["verified"] for r in results.values()),
                "results": results,
                "suspicions": suspicions,
                "killed": killed,
                "host_cpu_busy": cpu,  # all CPUs, from go to the last result
                "host_cpu_waiting": waiting,
            }
            if on_wave is not None:
                on_wave(wid, out[wid])
    return out
