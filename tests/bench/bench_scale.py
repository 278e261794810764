"""Fleet scale-out: 1 source, N clients started together, over shaped per-host links.

Every "host" runs in its own network namespace with a tc-shaped veth link (falls back
to unshaped loopback, with a message, where namespaces cannot be created). The real
WeightServer and client move a synthetic checkpoint; vLLM is not started. Modes:

    single      one client alone                       -> single_seconds
    serial      N clients, source serves one at a time -> Netloader's behaviour
    concurrent  N clients, source serves all at once
    chained     N clients, every instance serves one downstream; newcomers attach to
                the least-loaded instance that has or is receiving the weights, as
                the wave's gossip mesh shows it (loader.distribution.discovery.MeshPresence, the
                vLLM loader's code path), and forward buckets as soon as they
                verified them (pipelined chain)
    kill        chained with all clients, and one mid-chain relay SIGKILLed once it has
                forwarded half the checkpoint: its downstream re-attaches elsewhere

Repetitions (--reps, each a fleet of fresh processes): the first runs every mode for
N = 1, 2, 4, ... --clients (the plot); every one runs single, chained for 8 and for
--clients, and kill. Then the same on a fast link (--fast-rate-mbit, --fast-clients),
where a hop's fixed costs are no longer hidden behind a slow link's bucket time.

    python -m tests.bench.bench_scale [--clients 16] [--mib 192] [--rate-mbit 250]

The last stdout line is one JSON object; ratio_N = best makespan of concurrent/chained
for N clients divided by single_seconds of the same repetition (median over the
repetitions, with min/max beside it); relay_kill_growth = kill makespan / chained
makespan of the same repetition. The plot (path printed) and the JSON carry the same
run id. Also reported: how long a chain link's "receiving" status takes to reach the
gossip tables (gossip_*_seconds_median) and how many times an agent suspected a member
that was alive (false_suspicions), and how busy the host's CPUs were during one client
alone and during the chain (single_/chained_host_cpu_busy) and for how much of the
wave some runnable task waited for a core (single_/chained_host_cpu_waiting, from the
kernel's pressure stall information): at 100 % the chain is bound by this host's cores,
not by the protocol. hop_start_lag_s: how far each chain link's downstream starts after
its upstream (with its hop_handshake_s and hop_setup_s); chained_refusals_per_wave: the
busy / not-yet-receiving answers newcomers got while the chain formed.
hop_lag_first_bucket_s / hop_lag_last_bucket_s: how far a chain
link's downstream trails its upstream at the first and at the last verified bucket; the
growth between them is backlog the hop gained on the way (a stalled relay cannot catch
up: its upstream feeds it no faster than it sends).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from pathlib import Path

from tests.fleet.checkpoint import total_bytes
from tests.fleet.harness import run_waves
from tests.fleet.netns import LoopbackNetwork, NetnsNetwork, netns_unavailable_reason

MIB = float(1 << 20)
MODES = ("serial", "concurrent", "chained")


def sizes_up_to(clients: int) -> list[int]:
    """1, 2, 4, ... and `clients` itself."""
    sizes, n = [], 1
    while n < clients:
        sizes.append(n)
        n *= 2
    return [*sizes, clients]


def wave(mode: str, n: int, rep: int, **extra) -> dict:
    names = [f"c{i}" for i in range(1, n + 1)]
    capacity = n if mode == "concurrent" else 1
    node_mode = "chained" if mode == "kill" else mode
    wave_id = "single" if n == 1 and mode == "serial" else f"{mode}-{n}"
    return {"id": f"{wave_id}-r{rep}", "mode": node_mode, "capacity": capacity,
            "clients": names, **extra}


def mid_chain_victim(network, clients: int) -> str:
    """The client that should sit halfway down the chain: newcomers take turns at free
    slots in endpoint order (loader.distribution.reattach), so the chain forms in the
    order of the clients' addresses when every host has its own; on shared loopback, the
    one in the middle by name."""
    names = [f"c{i}" for i in range(1, clients + 1)]
    addresses = {name: f"{network.address(i)}:" for i, name in enumerate(names, start=1)}
    if len(set(addresses.values())) < clients:
        return f"c{clients // 2}"
    return sorted(names, key=addresses.get)[clients // 2 - 1]


def waves_for(
    clients: int, rep: int, sweep: bool, kill_after: int | None, victim: str
) -> list[dict]:
    """One repetition's waves; the kill wave last (its victim's process is gone after)."""
    waves = [wave("serial", 1, rep)]
    if sweep:
        for n in sizes_up_to(clients)[1:]:
            waves += [wave(mode, n, rep) for mode in MODES]
    else:
        waves += [wave("chained", n, rep) for n in sorted({min(8, clients), clients}) if n > 1]
    if kill_after is not None and clients >= 3:
        # where the victim sits in the chain is still the gossip's doing, so the JSON
        # says whose upstream it was and whether it had a downstream
        waves.append(wave("kill", clients, rep, victim=victim, die_after_forwarded=kill_after))
    return waves


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
    D's table did, `attach` until D's transfer from X started. Each client reads its
    table at every view change (tests.fleet.node.TableWatcher), in wall-clock time."""
    out: dict[str, list[float]] = {"advertised": [], "visible": [], "downstream": [], "attach": []}
    for d in results.values():
        x_name = d.get("upstream")
        if x_name not in results:
            continue  # served by the root
        receiving, d_start = _last_start(results[x_name]), _last_start(d)
        if receiving is None or d_start is None:
            continue
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
        out["attach"].append(d_start - receiving)
    return out


def _last_start(result: dict) -> float | None:
    """When the client's last attempt began to receive (wall clock), None if none did."""
    starts = [t for t, kind, _ in result["events"] if kind == "start"]
    return starts[-1] if starts else None


def _verified_times(result: dict) -> list[float]:
    """When each bucket of the client's last attempt was verified (wall clock)."""
    start = _last_start(result)
    if start is None:
        return []
    return [t for t, done in result["samples"] if t >= start and done > 0]


def hop_lags(results: dict[str, dict]) -> dict[str, list[float]]:
    """Per chain link X -> D (both clients), how far D's verified buckets trail X's: at
    the first bucket (attach, handshake, one bucket on the wire) and at the last one. The
    difference is backlog a hop gained on the way (e.g. waiting for a core) and could not
    lose again: a relay cannot send faster than its upstream feeds it."""
    out: dict[str, list[float]] = {"first": [], "last": []}
    for d in results.values():
        x = results.get(d.get("upstream"))
        if x is None:
            continue
        x_times, d_times = _verified_times(x), _verified_times(d)
        if x_times and d_times:
            out["first"].append(d_times[0] - x_times[0])
            out["last"].append(d_times[-1] - x_times[-1])
    return out


def hop_phases(results: dict[str, dict]) -> dict[str, list[float]]:
    """Per chain link X -> D (both clients): D's `handshake` (connect + hello/ack) and
    `setup` (process-group rendezvous) on the successful attempt, within the link's start
    lag (gossip_delays' `attach`)."""
    out: dict[str, list[float]] = {"handshake": [], "setup": []}
    for d in results.values():
        if d.get("upstream") not in results:
            continue
        out["handshake"].append(d.get("handshake_s", 0.0))
        out["setup"].append(d.get("setup_s", 0.0))
    return out


def spread(values: list[float]) -> dict:
    """median/min/max of one figure over the repetitions (None when never measured)."""
    if not values:
        return {"median": None, "min": None, "max": None}
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3)}


def host_name(network, endpoint: str | None, hosts: int) -> str | None:
    """The fleet node at `endpoint` (host 0 is the source, host i client ci); None on
    loopback, where every host shares one address."""
    if endpoint is None or not network.shaped:
        return None
    host = endpoint.rsplit(":", 1)[0]
    for i in range(hosts):
        if network.address(i) == host:
            return "source" if i == 0 else f"c{i}"
    return None


def analyse(waves: dict[str, dict], rep: int, clients: int, network) -> dict:
    """One repetition's figures: ratios against its own single client, the chain's
    per-hop delay, the kill's growth."""
    single = waves[f"single-r{rep}"]["results"]["c1"]["seconds"]

    def best(n: int) -> tuple[str, float] | None:
        found = [(m, waves[f"{m}-{n}-r{rep}"]["makespan"]) for m in ("concurrent", "chained")
                 if f"{m}-{n}-r{rep}" in waves]
        return min(found, key=lambda mf: mf[1]) if found else None

    chained = waves[f"chained-{clients}-r{rep}"]
    depths = chain_depths(chained["results"])
    longest = max(depths.values())
    ends = [r["end"] for r in chained["results"].values()]
    out = {
        "single": single,
        "ratios": {n: best(n)[1] / single for n in {min(8, clients), clients} if best(n)},
        "best": best(clients),
        "chained": chained["makespan"],
        "chained_cpu_busy": chained["host_cpu_busy"],
        "single_cpu_busy": waves[f"single-r{rep}"]["host_cpu_busy"],
        "chained_cpu_waiting": chained["host_cpu_waiting"],
        "single_cpu_waiting": waves[f"single-r{rep}"]["host_cpu_waiting"],
        "depth": longest,
        # the chain's first and last instance finish (depth - 1) hops apart
        "per_hop": (max(ends) - min(ends)) / (longest - 1) if longest > 1 else None,
        "delays": gossip_delays(chained["results"]),
        "lags": hop_lags(chained["results"]),
        "phases": hop_phases(chained["results"]),
        "refusals": sum(r.get("refusals", 0) for r in chained["results"].values()),
        "verified": all(w["all_verified"] for w in waves.values()),
        "suspicions": sum(len(w["suspicions"]) for w in waves.values()),
    }
    kill = waves.get(f"kill-{clients}-r{rep}")
    if kill is not None:
        victim_name = mid_chain_victim(network, clients)
        victim = kill["results"].get(victim_name)
        killed = kill["killed"]
        out["kill"] = {
            "rep": rep,
            "victim": victim_name,
            "killed": killed is not None,
            "victim_upstream": host_name(network, killed["upstream"], clients + 1)
            if killed else (victim or {}).get("upstream"),
            "lost_upstream": sorted(
                n for n, r in kill["results"].items()
                if any("busy" not in why for _, why in r["failures"])
            ),
            "makespan_s": round(kill["makespan"], 3),
            "growth": kill["makespan"] / chained["makespan"] if killed else None,
            "survivors_verified": kill["all_verified"],
        }
    return out


def plot(waves: dict[str, dict], clients: int, run_id: str, title: str, path: Path) -> None:
    """Makespan against N for each mode (the first repetition's sweep), and the verified
    bytes over time of each client in the chained and the kill wave."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    single = waves["single-r0"]["results"]["c1"]["seconds"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    sizes = sizes_up_to(clients)
    for mode in MODES:
        xs = [n for n in sizes if n == 1 or f"{mode}-{n}-r0" in waves]
        ys = [single if n == 1 else waves[f"{mode}-{n}-r0"]["makespan"] for n in xs]
        axes[0].plot(xs, ys, marker="o", label=mode)
    axes[0].axhline(1.25 * single, color="grey", linestyle=":", label="1.25 x single")
    axes[0].set_xscale("log", base=2)
    axes[0].set_xticks(sizes, [str(n) for n in sizes])
    axes[0].set_xlabel("clients started together (N)")
    axes[0].set_ylabel("makespan, seconds")
    axes[0].legend(fontsize=8)
    for ax, wid in zip(axes[1:], (f"chained-{clients}-r0", f"kill-{clients}-r0"), strict=True):
        wave = waves.get(wid)
        if wave is None:
            ax.set_visible(False)
            continue
        for _, r in sorted(wave["results"].items(), key=lambda kv: int(kv[0][1:])):
            if r["samples"]:
                ax.plot([t - wave["t0"] for t, _ in r["samples"]],
                        [b / MIB for _, b in r["samples"]], linewidth=1.0)
        if wave.get("killed"):
            ax.axvline(wave["killed"]["time"] - wave["t0"], color="red", linewidth=1,
                       label="relay killed")
            ax.legend(fontsize=8, loc="lower right")
        ax.axvline(single, color="grey", linestyle="--", linewidth=1)
        ax.set_title(f"{wid}: makespan {wave['makespan']:.2f}s")
        ax.set_xlabel("seconds since the first client started")
        ax.set_ylabel("verified MiB")
        ax.grid(alpha=0.3)
    axes[0].set_title(f"first repetition; single {single:.2f}s")
    fig.suptitle(f"bench-scale run {run_id}: {title}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(wave_id: str, wave: dict) -> None:
    per = sorted(r["seconds"] for r in wave["results"].values())
    retries = sum(1 for r in wave["results"].values() for f in r["failures"] if "busy" not in f[1])
    killed = "  relay killed" if wave.get("killed") else ""
    waiting = wave.get("host_cpu_waiting")
    waiting = f", a task waiting for a core {waiting:.0%} of the time" if waiting is not None else ""
    print(
        f"{wave_id:>16}: makespan {wave['makespan']:6.2f}s  client times "
        f"{per[0]:.2f}..{per[-1]:.2f}s  verified={wave['all_verified']}  "
        f"failed attempts={retries}  false suspicions={len(wave['suspicions'])}  "
        f"host CPU busy {wave['host_cpu_busy']:.0%}{waiting}{killed}",
        flush=True,
    )
    for t, observer, member, state in wave["suspicions"]:
        print(f"    {t - wave['t0']:+.2f}s {observer} saw {member} {state}", flush=True)
    if wave.get("killed"):  # how the chain re-formed: each failed attempt and when
        print(f"    relay killed at {wave['killed']['time'] - wave['t0']:+.2f}s", flush=True)
        for name, r in sorted(wave["results"].items()):
            for t, kind, source in r["events"]:
                print(f"    {t - wave['t0']:+.2f}s {name}: {kind} {source}", flush=True)
            for source, why in r["failures"]:
                if "busy" not in why:
                    print(f"    {name}: {source}: {why[:160]}", flush=True)


def open_network(hosts: int, rate_mbit: int, loopback: bool):
    reason = "--loopback given" if loopback else netns_unavailable_reason()
    if reason is None:
        return NetnsNetwork(hosts, rate_mbit)
    print(
        f"WARNING: network namespaces unavailable ({reason}); falling back to plain "
        "loopback: links are unshaped, so this machine's CPU, not the per-host link, "
        "is the bottleneck and the ratios do not model a cluster",
        flush=True,
    )
    return LoopbackNetwork(hosts)


def run_link(args, clients: int, rate_mbit: int, sweep: bool, kill: bool):
    """Every repetition on one network; returns (all waves, per-repetition figures)."""
    network = open_network(clients + 1, rate_mbit, args.loopback)
    print(f"network: {network.description}", flush=True)
    base = {"size_mib": args.mib, "bucket_mb": args.bucket_mb}
    buckets = total_bytes(args.mib) // (args.bucket_mb << 20)
    all_waves: dict[str, dict] = {}
    reps = []
    with network:
        for rep in range(args.reps):
            waves = waves_for(clients, rep, sweep and rep == 0, buckets // 2 if kill else None,
                              mid_chain_victim(network, clients))
            got = run_waves(network, clients, base, waves, args.timeout, on_wave=report)
            all_waves.update(got)
            reps.append(analyse(got, rep, clients, network))
    return network, all_waves, reps


def summary(reps: list[dict], clients: int, bucket_wire_s: float) -> dict:
    per_hop = [r["per_hop"] for r in reps if r["per_hop"] is not None]
    delays = {k: [v for r in reps for v in r["delays"][k]] for k in reps[0]["delays"]}
    out = {
        "single_seconds": spread([r["single"] for r in reps])["median"],
        "makespan_seconds": spread([r["best"][1] for r in reps])["median"],
        "chained_makespan_seconds": spread([r["chained"] for r in reps])["median"],
        "chain_depth": max(r["depth"] for r in reps),
        # what bounds the chained makespan on a small host: its CPUs, busy for the wave
        "single_host_cpu_busy": spread([r["single_cpu_busy"] for r in reps]),
        "chained_host_cpu_busy": spread([r["chained_cpu_busy"] for r in reps]),
        # ... and how long some runnable task waited for one of them (PSI; None without)
        "single_host_cpu_waiting": spread(
            [r["single_cpu_waiting"] for r in reps if r["single_cpu_waiting"] is not None]
        ),
        "chained_host_cpu_waiting": spread(
            [r["chained_cpu_waiting"] for r in reps if r["chained_cpu_waiting"] is not None]
        ),
        "per_hop_delay_s": spread(per_hop),
        "bucket_wire_s": round(bucket_wire_s, 3),
        "per_hop_overhead_beyond_bucket_s": spread([p - bucket_wire_s for p in per_hop]),
        # every chain link of every repetition: the lag at its first and at its last bucket
        "hop_lag_first_bucket_s": spread([v for r in reps for v in r["lags"]["first"]]),
        "hop_lag_last_bucket_s": spread([v for r in reps for v in r["lags"]["last"]]),
        # a hop's start: how far each link's downstream starts after its upstream, and
        # the downstream's handshake and group setup within that
        "hop_start_lag_s": spread(delays["attach"]),
        "hop_handshake_s": spread([v for r in reps for v in r["phases"]["handshake"]]),
        "hop_setup_s": spread([v for r in reps for v in r["phases"]["setup"]]),
        # busy / not-receiving answers the chain's newcomers got on the way (turns at free
        # slots and the relays' direct notices keep them from all asking the same relay)
        "chained_refusals_per_wave": spread([r["refusals"] for r in reps]),
        "gossip_advertised_seconds_median": spread(delays["advertised"])["median"],
        "gossip_visible_seconds_median": spread(delays["visible"])["median"],
        "gossip_attach_seconds_median": spread(delays["attach"])["median"],
        "all_verified": all(r["verified"] for r in reps),
        "false_suspicions": sum(r["suspicions"] for r in reps),
    }
    for n in sorted({min(8, clients), clients}):
        ratios = spread([r["ratios"][n] for r in reps if n in r["ratios"]])
        out[f"ratio_{n}"] = ratios["median"]
        out[f"ratio_{n}_min"], out[f"ratio_{n}_max"] = ratios["min"], ratios["max"]
    return out


def main() -> None:  # long: the benchmark's phases in the order they run, one script
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--mib", type=int, default=192, help="checkpoint size")
    parser.add_argument(
        "--bucket-mb", type=int, default=1,
        help="a relay forwards whole buckets, so a hop costs about one bucket's wire time: "
        "1 MiB of 192 MiB keeps the product's proportion (64 MiB buckets of a 16 GiB shard)",
    )
    parser.add_argument(
        "--rate-mbit", type=int, default=250,
        help="per-host link rate; low enough that the link, not this machine's CPU, "
        "is the bottleneck (as on a real cluster)",
    )
    parser.add_argument(
        "--fast-rate-mbit", type=int, default=2000,
        help="the fast-link run (0: none); chained only, with --fast-clients",
    )
    parser.add_argument(
        "--fast-clients", type=int, default=4,
        help="few enough that the hops' checksums (~0.75 CPU-s/GiB each) fit in this "
        "machine's two cores at the fast rate",
    )
    parser.add_argument("--plot", default="out/bench_scale.png")
    parser.add_argument("--timeout", type=float, default=300.0, help="per wave")
    parser.add_argument("--loopback", action="store_true", help="skip namespaces")
    args = parser.parse_args()
    if args.clients < 2 or args.reps < 1:
        parser.error("--clients must be >= 2 and --reps >= 1")

    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    size = total_bytes(args.mib)
    print(
        f"run {run_id}: checkpoint {size / MIB:.0f} MiB, {args.bucket_mb} MiB buckets; "
        f"{args.clients} clients, {args.reps} repetitions; the per-host rate is set low on "
        "purpose: this 2-core machine is shared, and the link must be the bottleneck, "
        "not the CPU",
        flush=True,
    )
    started = time.time()
    network, waves, reps = run_link(args, args.clients, args.rate_mbit, sweep=True, kill=True)
    bucket_wire_s = (args.bucket_mb << 20) * 8 / (args.rate_mbit * 1e6) if network.shaped else 0.0
    main_figures = summary(reps, args.clients, bucket_wire_s)
    kills = [r["kill"] for r in reps if "kill" in r]
    sweep = {m: {n: round(waves[f"{m}-{n}-r0"]["makespan"], 3)
                 for n in sizes_up_to(args.clients)[1:]} for m in MODES}
    single0 = reps[0]["single"]
    plot_path = Path(args.plot)
    plot(waves, args.clients, run_id,
         f"{args.rate_mbit} Mbit/s per host, {size / MIB:.0f} MiB" if network.shaped
         else "loopback (unshaped)", plot_path)

    fast = None
    if args.fast_rate_mbit and network.shaped:
        fast_net, _, fast_reps = run_link(
            args, args.fast_clients, args.fast_rate_mbit, sweep=False, kill=False
        )
        fast_wire = (args.bucket_mb << 20) * 8 / (args.fast_rate_mbit * 1e6)
        fast = {"link_mbit": args.fast_rate_mbit, "clients": args.fast_clients,
                **summary(fast_reps, args.fast_clients, fast_wire)}

    print(f"run {run_id}: per-hop delay {main_figures['per_hop_delay_s']} "
          f"(one bucket's wire time {bucket_wire_s:.3f}s)")
    for k in kills:
        print(f"kill (rep {k['rep']}): {k}")
    print(f"plot: {plot_path.resolve()} (run {run_id})")
    print(f"bench wall time {time.time() - started:.0f}s", flush=True)
    growth = spread([k["growth"] for k in kills if k["growth"] is not None])
    line = {
        "run_id": run_id,
        "clients": args.clients,
        "reps": args.reps,
        **{k: v for k, v in main_figures.items()
           if k not in ("per_hop_delay_s", "per_hop_overhead_beyond_bucket_s")},
        "ratio": main_figures[f"ratio_{args.clients}"],
        "ratio_16": main_figures.get("ratio_16"),
        "relay_kill_growth": growth["median"],
        "relay_kill_growth_min": growth["min"],
        "relay_kill_growth_max": growth["max"],
        "kills": kills,
        "all_verified": main_figures["all_verified"]
        and all(k["survivors_verified"] for k in kills)
        and (fast is None or fast["all_verified"]),
        "makespan_mode": reps[0]["best"][0],
        "serial_makespan_seconds": sweep["serial"][args.clients],
        "concurrent_makespan_seconds": sweep["concurrent"][args.clients],
        "serial_ratio": round(sweep["serial"][args.clients] / single0, 3),
        "sweep_makespan_seconds": sweep,
        "per_hop_delay_s": main_figures["per_hop_delay_s"]["median"],
        "per_hop_delay_s_min": main_figures["per_hop_delay_s"]["min"],
        "per_hop_delay_s_max": main_figures["per_hop_delay_s"]["max"],
        "per_hop_overhead_beyond_bucket_s": main_figures["per_hop_overhead_beyond_bucket_s"]["median"],
        "checkpoint_mib": round(size / MIB, 1),
        "link_mbit": args.rate_mbit if network.shaped else None,
        "network": "netns+tc" if network.shaped else "loopback",
        "fast_link": fast,
        "plot": str(plot_path.resolve()),
    }
    print(json.dumps(line))
    sys.exit(0 if line["all_verified"] else 1)


if __name__ == "__main__":
    main()
