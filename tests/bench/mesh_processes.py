"""The mesh figures measured from real processes: N `mesh agent`s on loopback with a secret
(CURVE on), each advertising a loader-shaped peer record.

1. Start N agents (each seeded with up to 3 earlier ones) and wait until one sees all alive.
2. Steady phase: wire bytes per member per second, from the kernel's per-socket counters
   (`ss -ti`: bytes_sent of every TCP socket of the agents, plus 52 bytes of IPv4+TCP
   headers per segment sent, pure ACKs included) — the quantity tests/bench/wire_model.py
   predicts for the simulator — and the agents' CPU time.
3. kill -9 of `--kills` agents, `--kill-every-s` apart; detection = from the kill until
   every surviving agent has logged the victim dead (from their logs' timestamps). Any
   other member logged dead is a false death; logged suspect, a false suspicion.

Then the simulator runs the same N under the same conditions (no loss, the same static
metadata, no stalls or churn) for comparison.
Run: python -m tests.bench.mesh_processes [--n 100]. Last stdout line: one JSON object.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import orjson

from tests.bench.bench_mesh import Realism, peer_record, percentile, run
from tests.bench.wire_model import TCP_IP_HEADER

_LOG_LINE = re.compile(r"^(\S+ \S+) INFO \S+: member (\S+) is (\w+) \(incarnation")
_SS_PORTS = re.compile(r"\s(\S+):(\d+)\s+(\S+):(\d+)\s*$")


def start_agents(n: int, base_port: int, secret: Path, logs: Path) -> list[subprocess.Popen]:
    procs = []
    rng = random.Random(7)
    for i in range(n):
        seeds = ",".join(f"127.0.0.1:{base_port + j}" for j in rng.sample(range(i), min(3, i)))
        meta = [f"{k}={v}" for k, v in peer_record(i, rng).items()]
        cmd = [sys.executable, "-m", "mesh.cli", "agent", "--bind", f"127.0.0.1:{base_port + i}",
               "--name", f"node-{i:04d}", "--secret-file", str(secret), "--meta", *meta]
        if seeds:
            cmd += ["--seeds", seeds]
        log = open(logs / f"node-{i:04d}.log", "wb")  # noqa: SIM115 - the child keeps it
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
        time.sleep(0.05)
    return procs


def alive_seen(base_port: int, secret: Path) -> int:
    out = subprocess.run(
        [sys.executable, "-m", "mesh.cli", "status", "--json", "--seeds", f"127.0.0.1:{base_port}",
         "--secret-file", str(secret)], capture_output=True, timeout=30)
    if out.returncode != 0:
        return 0
    return sum(1 for row in orjson.loads(out.stdout) if row.get("state") == "alive")


def socket_counters(lo: int, hi: int) -> dict[tuple, tuple[int, int]]:
    """(local, peer) -> (bytes_sent, segs_out) of every TCP socket with a port in [lo, hi)."""
    text = subprocess.run(["ss", "-tinH", "state", "established"], capture_output=True,
                          text=True).stdout.splitlines()
    found: dict[tuple, tuple[int, int]] = {}
    key = None
    for line in text:
        m = _SS_PORTS.search(line)
        if m and not line.startswith((" ", "\t")):
            ports = int(m.group(2)), int(m.group(4))
            key = (m.group(1), ports[0], m.group(3), ports[1]) if any(lo <= p < hi for p in ports) else None
            continue
        if key is not None:
            sent = re.search(r"bytes_sent:(\d+)", line)
            segs = re.search(r"segs_out:(\d+)", line)
            found[key] = (int(sent.group(1)) if sent else 0, int(segs.group(1)) if segs else 0)
            key = None
    return found


def wire_bytes(before: dict, after: dict) -> int:
    total = 0
    for key, (sent, segs) in after.items():
        sent0, segs0 = before.get(key, (0, 0))
        total += (sent - sent0) + (segs - segs0) * TCP_IP_HEADER
    return total


def cpu_seconds(procs) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in procs:
        try:
            fields = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError):
            pass
    return total / ticks


def state_changes(logs: Path) -> list[tuple[float, str, str, str]]:
    """(wall time, observer, subject, new state) from every agent's log."""
    events = []
    for path in logs.glob("node-*.log"):
        for line in path.read_text(errors="replace").splitlines():
            m = _LOG_LINE.match(line)
            if m:
                when = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                events.append((when, path.stem, m.group(2), m.group(3)))
    return events


def measure_steady(procs, n: int, base: int, steady_s: float) -> dict:
    counters, cpu0, t0 = socket_counters(base, base + n), cpu_seconds(procs), time.monotonic()
    started = time.time()
    time.sleep(steady_s)
    elapsed = time.monotonic() - t0
    return {
        "wire_bytes_per_member_s": wire_bytes(counters, socket_counters(base, base + n)) / n / elapsed,
        "cpu_share_per_agent": (cpu_seconds(procs) - cpu0) / n / elapsed,
        "started": started,
        "ended": time.time(),
    }


def kill_some(procs, n: int, kills: int, every_s: float) -> dict[str, float]:
    """kill -9 `kills` agents spread over the indices, `every_s` apart: name -> time killed."""
    killed_at = {}
    for k in range(kills):
        index = 1 + (k * (n - 1)) // max(1, kills)
        procs[index].send_signal(signal.SIGKILL)
        killed_at[f"node-{index:04d}"] = time.time()
        time.sleep(every_s)
    return killed_at


def stop_all(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()


def detection_figures(events, n: int, killed_at: dict[str, float], steady: dict) -> dict:
    """Detection times of the kills, false deaths and suspicions, from the agents' logs."""
    survivors = {f"node-{i:04d}" for i in range(n)} - set(killed_at)
    detect = []
    for victim, at in killed_at.items():
        first_dead: dict[str, float] = {}
        for when, observer, subject, state in events:
            if subject == victim and state == "dead" and observer in survivors and when >= at:
                first_dead[observer] = min(when, first_dead.get(observer, math.inf))
        if len(first_dead) == len(survivors):
            detect.append(max(first_dead.values()) - at)
    in_run = [e for e in events if e[0] >= steady["started"] and e[2] not in killed_at]
    return {
        "detect_p50_s": round(percentile(detect, 0.5), 3),
        "detect_p99_s": round(percentile(detect, 0.99), 3),
        "detected": f"{len(detect)}/{len(killed_at)}",
        "false_dead": len({subject for _, _, subject, state in in_run if state == "dead"}),
        "false_suspect_lines": sum(1 for e in in_run if e[3] == "suspect"),
        "steady_suspect_lines": sum(1 for e in in_run if e[3] == "suspect" and e[0] <= steady["ended"]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--base-port", type=int, default=27000)
    parser.add_argument("--steady-s", type=float, default=60.0)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--kill-every-s", type=float, default=15.0)
    parser.add_argument("--sim-steady-s", type=float, default=600.0)
    args = parser.parse_args(argv)
    n, base = args.n, args.base_port
    work = Path(tempfile.mkdtemp(prefix="mesh-processes-"))
    secret = work / "secret"
    subprocess.run([sys.executable, "-m", "mesh.cli", "keygen", str(secret)], check=True,
                   capture_output=True)
    procs = start_agents(n, base, secret, work)
    try:
        deadline = time.monotonic() + 180
        seen = 0
        while time.monotonic() < deadline and (seen := alive_seen(base, secret)) < n:
            time.sleep(2)
        print(f"{seen}/{n} agents alive in node-0000's view; logs in {work}", flush=True)
        time.sleep(10)
        steady = measure_steady(procs, n, base, args.steady_s)
        killed_at = kill_some(procs, n, args.kills, args.kill_every_s)
        time.sleep(20)
    finally:
        stop_all(procs)

    processes = {
        "wire_bytes_per_member_s": round(steady["wire_bytes_per_member_s"], 1),
        "cpu_share_per_agent": round(steady["cpu_share_per_agent"], 4),
        **detection_figures(state_changes(work), n, killed_at, steady),
    }
    # the same conditions in the simulator: loopback (no loss), the same static peer
    # records, no injected stalls or metadata churn; handling lag as in a real agent
    like_loopback = Realism(stall_rate_per_h=0.0, meta_churn_fraction=0.0)
    sim = run(n, 0.0, 1, args.sim_steady_s, args.kills, args.kill_every_s, like_loopback)
    line = {
        "n": n,
        "processes": processes,
        "simulator": {k: sim[k] for k in ("wire_bytes_per_member_s", "bytes_per_member_s",
                                          "detect_p50_s", "detect_p99_s", "false_dead",
                                          "false_suspect")},
    }
    print(orjson.dumps(line).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
