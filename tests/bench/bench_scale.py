"""Fleet scale-out: 1 source, N clients started together, over shaped per-host links.

Every "host" runs in its own network namespace with a tc-shaped veth link (falls back
to unshaped loopback, with a message, where namespaces cannot be created). The real
WeightServer and client move a synthetic checkpoint; vLLM is not started. Waves, all
in one run with the same processes:

    single      one client alone                       -> single_seconds
    serial      N clients, source serves one at a time -> Netloader's behaviour
    concurrent  N clients, source serves all at once
    chained     N clients, every instance serves one downstream; newcomers attach to
                the least-loaded instance that has or is receiving the weights, as
                the wave's gossip mesh shows it (loader.distribution.discovery.MeshPresence, the
                vLLM loader's code path), and forward buckets as soon as they
                verified them (pipelined chain)

    python -m tests.bench.bench_scale [--clients 8] [--mib 192] [--rate-mbit 250]

The last stdout line is one JSON object; ratio = best makespan of concurrent/chained
divided by single_seconds (both measured in this run). A PNG of every client's
verified bytes over time is written (path printed). Also reported: how long a chain
link's "receiving" status takes to reach the gossip tables (gossip_*_seconds_median)
and how many times an agent suspected a member (none fails here: all false).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from tests.fleet.checkpoint import total_bytes
from tests.fleet.harness import run_waves
from tests.fleet.netns import LoopbackNetwork, NetnsNetwork, netns_unavailable_reason

MIB = float(1 << 20)


def waves_for(clients: int) -> list[dict]:
    names = [f"c{i}" for i in range(1, clients + 1)]
    return [
        {"id": "single", "mode": "serial", "capacity": 1, "clients": ["c1"]},
        {"id": "serial", "mode": "serial", "capacity": 1, "clients": names},
        {"id": "concurrent", "mode": "concurrent", "capacity": clients, "clients": names},
        {"id": "chained", "mode": "chained", "capacity": 1, "clients": names},
    ]


def chain_depths(results: dict[str, dict]) -> dict[str, int]:
    """Hops from the root for each client of a chained wave (from who served whom)."""
    depths: dict[str, int] = {}

    def depth(name: str, seen: tuple = ()) -> int:
        if name not in depths:
            upstream = results[name].get("upstream")
            if upstream not in results or upstream in seen:
                depths[name] = 1
            else:
                depths[name] = depth(upstream, (*seen, name)) + 1
        return depths[name]

    for name in results:
        depth(name)
    return depths


def gossip_delays(results: dict[str, dict]) -> dict[str, list[float]]:
    """Per chain link X -> D (X a client), from X's last transfer start (it is receiving):
    `advertised` until X's own agent carried the new status (MeshPresence refresh),
    `visible` until the first other client's table showed X receiving, `downstream` until
    D's table did, `attach` until D's transfer from X started. The tables are polled
    every 10 ms by each client (tests.fleet.node.TableWatcher), in wall-clock time."""
    out: dict[str, list[float]] = {"advertised": [], "visible": [], "downstream": [], "attach": []}
    for d in results.values():
        x_name = d.get("upstream")
        if x_name not in results:
            continue  # served by the root
        x_starts = [t for t, kind, _ in results[x_name]["events"] if kind == "start"]
        d_starts = [t for t, kind, _ in d["events"] if kind == "start"]
        if not x_starts or not d_starts:
            continue
        receiving = x_starts[-1]
        if results[x_name].get("advertised_receiving") is not None:
            out["advertised"].append(results[x_name]["advertised_receiving"] - receiving)
        seen = [
            r["first_seen_receiving"][x_name]
            for n, r in results.items()
            if n != x_name and x_name in r.get("first_seen_receiving", {})
        ]
        if seen:
            out["visible"].append(min(seen) - receiving)
        if x_name in d.get("first_seen_receiving", {}):
            out["downstream"].append(d["first_seen_receiving"][x_name] - receiving)
        out["attach"].append(d_starts[-1] - receiving)
    return out


def _stats(values: list[float]) -> str:
    if not values:
        return "n/a"
    values = sorted(values)
    return f"median {statistics.median(values):.3f}s, min {values[0]:.3f}s, max {values[-1]:.3f}s"


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def plot(waves: dict[str, dict], single_s: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = ("serial", "concurrent", "chained")
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), sharey=True)
    for ax, mode in zip(axes, modes, strict=True):
        wave = waves[mode]
        for name, r in sorted(wave["results"].items(), key=lambda kv: int(kv[0][1:])):
            samples = r["samples"]
            if not samples:
                continue
            xs = [t - wave["t0"] for t, _ in samples]
            ys = [b / MIB for _, b in samples]
            ax.plot(xs, ys, label=name, linewidth=1.2)
        ax.axvline(single_s, color="grey", linestyle="--", linewidth=1, label="single client")
        ax.set_title(f"{mode}: makespan {wave['makespan']:.1f}s")
        ax.set_xlabel("seconds since start")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("verified MiB")
    axes[-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:  # long: the benchmark's phases in the order they run, one script
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--mib", type=int, default=192, help="checkpoint size")
    parser.add_argument("--bucket-mb", type=int, default=4)
    parser.add_argument(
        "--rate-mbit",
        type=int,
        default=250,
        help="per-host link rate; low enough that the link, not this machine's CPU, "
        "is the bottleneck (as on a real cluster)",
    )
    parser.add_argument("--plot", default="out/bench_scale.png")
    parser.add_argument("--timeout", type=float, default=300.0, help="per wave")
    parser.add_argument("--loopback", action="store_true", help="skip namespaces")
    args = parser.parse_args()

    reason = "--loopback given" if args.loopback else netns_unavailable_reason()
    hosts = args.clients + 1
    if reason is None:
        network = NetnsNetwork(hosts, args.rate_mbit)
    else:
        network = LoopbackNetwork(hosts)
        print(
            f"WARNING: network namespaces unavailable ({reason}); falling back to plain "
            "loopback: links are unshaped, so this machine's CPU, not the per-host link, "
            "is the bottleneck and the ratios do not model a cluster",
            flush=True,
        )
    size = total_bytes(args.mib)
    print(f"network: {network.description}", flush=True)
    print(
        f"checkpoint: {size / MIB:.0f} MiB, {args.bucket_mb} MiB buckets; "
        f"{args.clients} clients; the per-host rate is set low on purpose: this 2-core "
        "machine is shared, and the link must be the bottleneck, not the CPU",
        flush=True,
    )
    started = time.time()

    def report(wave_id: str, wave: dict) -> None:
        per = sorted(r["seconds"] for r in wave["results"].values())
        retries = sum(
            1 for r in wave["results"].values() for f in r["failures"] if "busy" not in f[1]
        )
        print(
            f"{wave_id:>10}: makespan {wave['makespan']:6.2f}s  client times "
            f"{per[0]:.2f}..{per[-1]:.2f}s  verified={wave['all_verified']}  "
            f"failed attempts={retries}  false suspicions={len(wave['suspicions'])}",
            flush=True,
        )
        for t, observer, member, state in wave["suspicions"]:
            print(f"    {t - wave['t0']:+.2f}s {observer} saw {member} {state}", flush=True)

    base = {"size_mib": args.mib, "bucket_mb": args.bucket_mb}
    with network:
        waves = run_waves(
            network, args.clients, base, waves_for(args.clients), args.timeout, on_wave=report
        )
    single = waves["single"]["results"]["c1"]["seconds"]
    serial = waves["serial"]["makespan"]
    best_mode = min(("concurrent", "chained"), key=lambda m: waves[m]["makespan"])
    makespan = waves[best_mode]["makespan"]
    chained = waves["chained"]
    depths = chain_depths(chained["results"])
    longest = max(depths.values())
    ends = [r["end"] for r in chained["results"].values()]
    # the chain's first and last instance finish (depth - 1) hops apart
    per_hop = (max(ends) - min(ends)) / (longest - 1) if longest > 1 else None
    chain = " -> ".join(["source", *sorted(depths, key=depths.get)])
    print(f"chained topology (by depth): {chain}; depth {longest}")
    if per_hop is not None:
        print(f"per-hop delay (last - first finish in the chain) / (depth - 1): {per_hop:.3f}s")
    delays = gossip_delays(chained["results"])
    print(
        "gossip per chain link, from the upstream's transfer start (it is receiving): "
        f"in its own agent's meta {_stats(delays['advertised'])}; "
        f"first seen receiving by another client {_stats(delays['visible'])}; "
        f"by its downstream {_stats(delays['downstream'])}; "
        f"downstream's transfer from it started {_stats(delays['attach'])}"
    )
    suspicions = sum(len(w["suspicions"]) for w in waves.values())
    plot_path = Path(args.plot)
    plot(waves, single, plot_path)
    print(f"plot: {plot_path.resolve()}")
    print(f"bench wall time {time.time() - started:.0f}s", flush=True)
    line = {
        "clients": args.clients,
        "single_seconds": round(single, 3),
        "makespan_seconds": round(makespan, 3),
        "serial_makespan_seconds": round(serial, 3),
        "ratio": round(makespan / single, 3),
        "all_verified": all(w["all_verified"] for w in waves.values()),
        "makespan_mode": best_mode,
        "concurrent_makespan_seconds": round(waves["concurrent"]["makespan"], 3),
        "chained_makespan_seconds": round(chained["makespan"], 3),
        "serial_ratio": round(serial / single, 3),
        "chain_depth": longest,
        "per_hop_overhead_seconds": None if per_hop is None else round(per_hop, 3),
        "gossip_advertised_seconds_median": _median(delays["advertised"]),
        "gossip_visible_seconds_median": _median(delays["visible"]),
        "gossip_attach_seconds_median": _median(delays["attach"]),
        "false_suspicions": suspicions,
        "checkpoint_mib": round(size / MIB, 1),
        "link_mbit": args.rate_mbit if network.shaped else None,
        "network": "netns+tc" if network.shaped else "loopback",
        "plot": str(plot_path.resolve()),
    }
    print(json.dumps(line))
    sys.exit(0 if line["all_verified"] else 1)


if __name__ == "__main__":
    main()
