"""Gossip mesh benchmark in the deterministic simulator (real agent loop, core and codec).

Scenario per cluster size N, every message subject to `loss`:
  1. N members join through 3 seeds, then a warm-up;
  2. a steady phase (>= 1 simulated hour at N=100): bytes sent per member per second
     are measured here, and any healthy member declared dead counts as false_dead;
  3. churn cycles: crash a random member (detect = until every running member marks
     it dead), then half a cycle later start a new member (join = until every running
     member sees it alive). false_dead keeps counting through this phase.

The last stdout line is one JSON object for N=100. Run: python -m tests.bench.bench_mesh
Options: --n 100 --loss 0.05 --steady-s 3600 --cycles 120 --big-n 1000 (0 to skip).
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time

import orjson

from mesh.config import ProtocolConfig
from mesh.members import ALIVE, DEAD
from mesh.sim import Simulator


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
    return ordered[index]


class Recorder:
    """Turns the simulator's per-observer state changes into join/detect latencies."""

    def __init__(self) -> None:
        self.crashed: set[str] = set()
        self.false_dead: set[str] = set()
        self.waiting_alive: dict[str, tuple[float, set[str]]] = {}
        self.waiting_dead: dict[str, tuple[float, set[str]]] = {}
        self.join_s: list[float] = []
        self.detect_s: list[float] = []

    def on_event(self, now, observer, subject, old, new, inc) -> None:
        if new == DEAD and subject not in self.crashed:
            self.false_dead.add(subject)
        if new == ALIVE:
            self._seen(self.waiting_alive, self.join_s, now, observer, subject)
        if new == DEAD:
            self._seen(self.waiting_dead, self.detect_s, now, observer, subject)

    @staticmethod
    def _seen(waiting, results, now, observer, subject) -> None:
        pending = waiting.get(subject)
        if pending is None:
            return
        started, observers = pending
        observers.discard(observer)
        if not observers:
            del waiting[subject]
            results.append(now - started)

    def expect(self, waiting, subject: str, now: float, observers: set[str]) -> None:
        waiting[subject] = (now, set(observers))

    def observer_gone(self, name: str) -> None:
        for waiting in (self.waiting_alive, self.waiting_dead):
            for _subject, (_started, observers) in waiting.items():
                observers.discard(name)


def run(n: int, loss: float, seed: int, steady_s: float, cycles: int, cycle_s: float,
        config: ProtocolConfig | None = None) -> dict:
    rec = Recorder()
    sim = Simulator(seed=seed, loss=loss, config=config, on_event=rec.on_event)
    rng = random.Random(seed)
    names = [f"node-{i:04d}" for i in range(n)]
    sim.add_node(names[0])
    for i, name in enumerate(names[1:], start=1):
        sim.add_node(name, seeds=rng.sample(names[:i], min(3, i)))
        sim.run_for(0.02)
    sim.run_for(30.0)
    if not sim.converged():
        sim.run_for(30.0)
    converged_after_bootstrap = sim.converged()

    bytes_before = sum(node.sent_bytes for node in sim.nodes.values())
    steady_start = sim.now
    sim.run_for(steady_s)
    steady_bytes = sum(node.sent_bytes for node in sim.nodes.values()) - bytes_before
    bytes_per_member_s = steady_bytes / n / (sim.now - steady_start)

    next_id = n
    for _ in range(cycles):
        running = [node.name for node in sim.up_nodes()]
        victim = rng.choice(running)
        rec.crashed.add(victim)
        sim.crash(victim)
        rec.observer_gone(victim)
        rec.expect(rec.waiting_dead, victim, sim.now, set(running) - {victim})
        sim.run_for(cycle_s / 2)
        newcomer = f"node-{next_id:04d}"
        next_id += 1
        running = [node.name for node in sim.up_nodes()]
        rec.expect(rec.waiting_alive, newcomer, sim.now, set(running))
        sim.add_node(newcomer, seeds=rng.sample(running, 3))
        sim.run_for(cycle_s / 2)
    sim.run_for(20.0)
    unfinished = len(rec.waiting_alive) + len(rec.waiting_dead)

    return {
        "n": n,
        "loss": loss,
        "join_p50_s": round(percentile(rec.join_s, 0.5), 3),
        "join_p99_s": round(percentile(rec.join_s, 0.99), 3),
        "detect_p50_s": round(percentile(rec.detect_s, 0.5), 3),
        "detect_p99_s": round(percentile(rec.detect_s, 0.99), 3),
        "false_dead": len(rec.false_dead),
        "bytes_per_member_s": round(bytes_per_member_s, 1),
        "sim_hours": round(sim.now / 3600, 3),
        "samples": {"join": len(rec.join_s), "detect": len(rec.detect_s), "unfinished": unfinished},
        "converged_after_bootstrap": converged_after_bootstrap,
    }


def _time_until(sim: Simulator, predicate, limit: float, step: float = 0.05) -> float | None:
    start = sim.now
    while sim.now - start <= limit:
        if predicate():
            return round(sim.now - start, 3)
        sim.run_for(step)
    return None


def run_scenarios(n: int, loss: float, seed: int) -> dict:
    """Single-shot figures for the other targets: metadata update, leave, restart, partition heal."""
    sim = Simulator(seed=seed, loss=loss)
    names = [f"node-{i:04d}" for i in range(n)]
    rng = random.Random(seed)
    sim.add_node(names[0])
    for i, name in enumerate(names[1:], start=1):
        sim.add_node(name, seeds=rng.sample(names[:i], min(3, i)))
        sim.run_for(0.02)
    sim.run_for(30.0)

    def everyone(subject, check):
        return all(check(node.core.view.get(subject)) for node in sim.up_nodes() if node.name != subject)

    figures = {}
    sim.advertise(names[5], {"endpoint": "10.1.1.1:9000", "load": 7})
    figures["meta_update_s"] = _time_until(
        sim, lambda: everyone(names[5], lambda e: e is not None and e.meta.get("load") == 7), 10)
    sim.leave(names[6])
    figures["leave_seen_s"] = _time_until(
        sim, lambda: everyone(names[6], lambda e: e is not None and e.state == 3), 10)
    sim.crash(names[7])
    sim.run_for(1.0)
    sim.restart(names[7], meta={"generation": 2})
    figures["restart_accepted_s"] = _time_until(
        sim, lambda: everyone(names[7], lambda e: e is not None and e.state == ALIVE
                              and e.meta.get("generation") == 2), 30)
    half = [node.name for node in sim.up_nodes()]
    sim.partition(half[: len(half) // 2], half[len(half) // 2:])
    sim.run_for(30.0)
    sim.heal()
    figures["partition_30s_heal_s"] = _time_until(sim, sim.converged, 60, step=0.1)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--loss", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--steady-s", type=float, default=3600.0)
    parser.add_argument("--cycles", type=int, default=120)
    parser.add_argument("--cycle-s", type=float, default=15.0)
    parser.add_argument("--big-n", type=int, default=1000, help="0 skips the large run")
    parser.add_argument("--big-steady-s", type=float, default=60.0)
    parser.add_argument("--big-cycles", type=int, default=20)
    args = parser.parse_args(argv)

    if args.big_n:
        started = time.perf_counter()
        big = run(args.big_n, args.loss, args.seed, args.big_steady_s, args.big_cycles, args.cycle_s)
        big["wall_s"] = round(time.perf_counter() - started, 1)
        print(f"N={args.big_n}: " + orjson.dumps(big).decode(), flush=True)

    scenarios = run_scenarios(args.n, args.loss, args.seed)
    print(f"N={args.n} scenarios: " + orjson.dumps(scenarios).decode(), flush=True)

    started = time.perf_counter()
    result = run(args.n, args.loss, args.seed, args.steady_s, args.cycles, args.cycle_s)
    wall = time.perf_counter() - started
    goals = {"join_p99_s": 2.0, "detect_p99_s": 8.0, "false_dead": 0, "bytes_per_member_s": 500}
    met = {k: result[k] <= v for k, v in goals.items()}
    print(f"N={args.n} wall {wall:.1f}s samples {result['samples']} goals met {met}", flush=True)
    line = {k: result[k] for k in
            ("n", "loss", "join_p99_s", "detect_p99_s", "false_dead", "bytes_per_member_s", "sim_hours")}
    line.update({"join_p50_s": result["join_p50_s"], "detect_p50_s": result["detect_p50_s"]})
    print(orjson.dumps(line).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
