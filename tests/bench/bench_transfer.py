"""Benchmark the weight transfer between two processes over gloo on 127.0.0.1.

Moves >= 1 GiB in >= 200 tensors with the real WeightServer / fetch_from_sources (in
place, as the model loader fetches), and the same bytes over a plain TCP socket in the
same run, so the ratio is robust to how fast loopback happens to be on this machine, and
the same bucket plan over a bare Gloo group (tests/bench/bare_gloo.py): what Gloo itself
reaches here, so the gap splits into Gloo's share and the product's.
Also reports the client's peak RSS against the weights (goal: <= weights + two buckets)
and the CPU time each side spends per GiB (whole process: user + system, every thread).

    python -m tests.bench.bench_transfer [--mib 1025] [--bucket-mb 64] [--runs 3]

The machine is shared, so rounds alternate (raw and bare Gloo, net, raw and bare Gloo,
..., raw and bare Gloo); each netloader run is compared with the better of the raw (and
of the bare Gloo) rounds on either side of it. min/median/max over the runs are
printed; `ratio` in the last stdout line (one JSON object) is the minimum. The load average is printed beside the figures. Then the
resharding case (tests/bench/bench_reshard.py; `--reshard-mib 0` skips it).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import socket
import statistics
import time

import orjson
import torch

from tests.bench import bare_gloo, bench_reshard

FINGERPRINT = "be" * 32
GIB = float(1 << 30)


def make_tensors(total_mib: int, seed: int = 0, empty: bool = False) -> dict[str, torch.Tensor]:
    return dict(iter_tensors(total_mib, seed, empty))


def iter_tensors(total_mib: int, seed: int = 0, empty: bool = False):
    """96 large, 128 medium and 64 tiny float32 tensors, like a small decoder's layers."""
    g = torch.Generator().manual_seed(seed)
    tiny_numel = 4096
    medium_numel = max(1, (total_mib << 20) // 4 // 4 // 128)
    large_numel = max(1, ((total_mib << 20) // 4 - 128 * medium_numel - 64 * tiny_numel) // 96)
    for i in range(96):
        if i < 32:
            for j in range(2):
                yield f"layers.{i}.tiny{j}", _tensor(tiny_numel, g, empty)
            for j in range(4):
                yield f"layers.{i}.medium{j}", _tensor(medium_numel, g, empty)
        yield f"layers.{i // 3}.large{i % 3}", _tensor(large_numel, g, empty)


_BLOCK = 1 << 20  # random floats, tiled with a per-tensor shift: cheap to (re)generate


def _tensor(numel: int, g: torch.Generator, empty: bool) -> torch.Tensor:
    if empty:
        return torch.zeros(numel)
    base = _random_block(g.initial_seed())
    shift = int(torch.randint(0, _BLOCK, (1,), generator=g))
    pattern = torch.cat([base[shift:], base[:shift]])
    out = torch.empty(numel)
    dst, src = out.numpy(), pattern.numpy()
    for pos in range(0, numel, _BLOCK):
        k = min(_BLOCK, numel - pos)
        dst[pos : pos + k] = src[:k]  # numpy: a plain memcpy, no thread pool
    return out


_blocks: dict[int, torch.Tensor] = {}


def _random_block(seed: int) -> torch.Tensor:
    if seed not in _blocks:
        _blocks[seed] = torch.randn(_BLOCK, generator=torch.Generator().manual_seed(seed))
    return _blocks[seed]


def _byte_views(tensors):
    from loader.transfer.buckets import byte_view

    return [memoryview(byte_view(t).numpy()) for t in tensors.values()]


# ---- CPU accounting -----------------------------------------------------------------


def cpu_seconds() -> float:
    """User + system CPU time of this process (all its threads)."""
    t = os.times()
    return t.user + t.system


def load_average() -> float:
    return os.getloadavg()[0]


# ---- source process -----------------------------------------------------------------


def _logging(args) -> None:
    import logging

    level = logging.DEBUG if args.debug else logging.WARNING
    logging.basicConfig(level=level, format="%(relativeCreated)7d %(processName)s %(message)s")
    logging.getLogger("vllm").setLevel(logging.WARNING)


def source_main(args, to_client, from_client) -> None:
    """Serve the tensors; answer the client's commands: "raw" (send them once over a
    plain socket), "gloo" (the bucket plan once over a bare Gloo group), "cpu" (this
    process's CPU time so far, all threads), "stop"."""
    _logging(args)
    torch.set_num_threads(1)
    import vllm.distributed.utils  # noqa: F401  (import cost is not part of a transfer)

    from loader.config import TransferSettings
    from loader.transfer.server import WeightServer

    tensors = make_tensors(args.mib)
    settings = TransferSettings(bucket_mb=args.bucket_mb, bucket_timeout_s=args.bucket_timeout)
    server = WeightServer(tensors, FINGERPRINT, 0, settings, host="127.0.0.1")
    bare = bare_gloo.BareSource(tensors, settings.bucket_bytes, settings.streams)
    server.start()
    server.wait_ready(600)
    raw = socket.socket()
    raw.bind(("127.0.0.1", 0))
    raw.listen(4)
    to_client.put({"endpoint": server.endpoint, "raw_port": raw.getsockname()[1]})
    while (command := from_client.get(timeout=900)) != "stop":
        if command == "cpu":
            to_client.put(cpu_seconds())
        elif command == "gloo":
            bare.serve(to_client.put, args.bucket_timeout)
        elif command == "raw":
            conn, _ = raw.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for view in _byte_views(tensors):
                conn.sendall(view)
            conn.recv(1)
            conn.close()
    server.stop()


# ---- client process -----------------------------------------------------------------


class Meter:
    """CPU time of both processes over one round."""

    def __init__(self, to_source, from_source) -> None:
        self.to_source, self.from_source = to_source, from_source

    def snapshot(self) -> tuple:
        self.to_source.put("cpu")
        source_cpu = self.from_source.get(timeout=60)
        return cpu_seconds(), source_cpu, time.perf_counter()

    @staticmethod
    def delta(before: tuple, after: tuple) -> dict:
        return {
            "client_cpu_s": after[0] - before[0],
            "source_cpu_s": after[1] - before[1],
            "wall_s": after[2] - before[2],
        }


def client_main(args, info, to_source, from_source, to_parent) -> None:
    _logging(args)
    torch.set_num_threads(1)
    import vllm.distributed.utils  # noqa: F401

    from loader.config import TransferSettings
    from loader.transfer.checksum import algorithm_for_device, warm_up
    from loader.transfer.client import fetch_from_sources

    warm_up(algorithm_for_device("cpu"))  # as a vLLM worker does while it builds the model
    rss_before = _peak_rss()
    dest = make_tensors(args.mib, empty=True)  # zeros: pages touched, as in a built model
    weights = sum(t.numel() * t.element_size() for t in dest.values())
    rss_allocated = _peak_rss()
    settings = TransferSettings(bucket_mb=args.bucket_mb, bucket_timeout_s=args.bucket_timeout)
    meter = Meter(to_source, from_source)
    raw_rounds, gloo_rounds, runs = [], [], []
    for i in range(2 * args.runs + 1):  # raw and bare Gloo, net, raw and bare Gloo, ...
        if i % 2 == 1:
            for t in dest.values():
                t.zero_()  # the fetch must write every byte for the check below to pass
        before = meter.snapshot()
        load = load_average()
        if i % 2 == 0:
            to_source.put("raw")
            seconds = raw_tcp_receive(info["raw_port"], dest)
            raw_rounds.append({**Meter.delta(before, meter.snapshot()), "load": load, "seconds": seconds})
            before = meter.snapshot()
            to_source.put("gloo")
            port = from_source.get(timeout=60)
            bare = bare_gloo.receive(port, dest, settings.bucket_bytes, settings.streams, args.bucket_timeout)
            gloo_rounds.append({**Meter.delta(before, meter.snapshot()), "load": load, **bare})
            continue
        outcome = fetch_from_sources(
            [info["endpoint"]], FINGERPRINT, dest, 0, settings, in_place=True
        )
        used = Meter.delta(before, meter.snapshot())
        identical = all(torch.equal(dest[name], ref) for name, ref in iter_tensors(args.mib))
        runs.append(
            {
                **used,
                "load": load,
                "ok": outcome.ok,
                "failures": outcome.failures,
                "identical": identical,
                "seconds": outcome.seconds,
                "handshake_s": outcome.handshake_s,
                "setup_s": outcome.setup_s,
                "bytes": outcome.bytes,
            }
        )
    to_source.put("stop")
    to_parent.put(
        {
            "runs": runs,
            "raw_rounds": raw_rounds,
            "gloo_rounds": gloo_rounds,
            "tensors": len(dest),
            "weights": weights,
            "rss_before": rss_before,
            "rss_allocated": rss_allocated,
            "rss_after_fetch": _peak_rss(),
        }
    )


def raw_tcp_receive(port: int, dest: dict[str, torch.Tensor]) -> float:
    t = time.perf_counter()
    conn = socket.create_connection(("127.0.0.1", port))
    for view in _byte_views(dest):
        got = 0
        while got < len(view):
            n = conn.recv_into(view[got:])
            if n == 0:
                raise ConnectionError("raw TCP source closed early")
            got += n
    conn.sendall(b"k")
    conn.close()
    return time.perf_counter() - t


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---- driver -------------------------------------------------------------------------


def _spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def _per_gib(seconds: float, nbytes: int) -> float:
    return seconds / (nbytes / GIB)


def run_benchmark(args) -> dict:
    ctx = mp.get_context("spawn")
    from_source, to_source, from_client = ctx.Queue(), ctx.Queue(), ctx.Queue()
    source = ctx.Process(target=source_main, args=(args, from_source, to_source), daemon=True)
    source.start()
    info = from_source.get(timeout=600)
    client = ctx.Process(
        target=client_main, args=(args, info, to_source, from_source, from_client), daemon=True
    )
    client.start()
    result = from_client.get(timeout=1800)
    client.join(60)
    source.join(30)
    for r in result["runs"]:
        if not r["ok"] or not r["identical"]:
            raise SystemExit(f"transfer failed: {r['failures']} identical={r['identical']}")
    return result


def summarize(result: dict, bucket_mb: int) -> dict:  # long: one printed line per figure
    runs, raws = result["runs"], result["raw_rounds"]
    nbytes = runs[0]["bytes"]
    raw_rate = [nbytes / r["seconds"] / GIB for r in raws]
    glooes = result["gloo_rounds"]
    gloo_rate = [nbytes / r["seconds"] / GIB for r in glooes]
    for i, run in enumerate(runs):  # raw rounds i and i + 1 surround run i
        run["gib_s"] = nbytes / run["seconds"] / GIB
        run["raw_gib_s"] = max(raw_rate[i], raw_rate[i + 1])
        run["ratio"] = run["gib_s"] / run["raw_gib_s"]
        run["to_gloo"] = run["gib_s"] / max(gloo_rate[i], gloo_rate[i + 1])
    ratio = _spread([r["ratio"] for r in runs])
    to_gloo = _spread([r["to_gloo"] for r in runs])
    gloo_to_raw = _spread([g / r for g, r in zip(gloo_rate, raw_rate, strict=True)])
    rate = _spread([r["gib_s"] for r in runs])
    cpu = {
        side: _spread([_per_gib(r[f"{side}_cpu_s"], nbytes) for r in runs])
        for side in ("client", "source")
    }
    raw_cpu, gloo_cpu = (
        {side: statistics.median(_per_gib(r[f"{side}_cpu_s"], nbytes) for r in rounds)
         for side in ("client", "source")}
        for rounds in (raws, glooes)
    )
    print(f"weights: {nbytes / GIB:.3f} GiB in {result['tensors']} tensors, {bucket_mb} MiB buckets")
    for i, run in enumerate(runs):
        print(
            f"run {i + 1}: netloader {run['gib_s']:.3f} GiB/s ({run['seconds']:.2f} s; handshake "
            f"{run['handshake_s'] * 1000:.0f} ms, group {run['setup_s'] * 1000:.0f} ms), raw TCP "
            f"{raw_rate[i]:.3f} / {raw_rate[i + 1]:.3f} GiB/s before/after: ratio {run['ratio']:.3f}"
            f"  [load {run['load']:.2f}]"
        )
    print(
        f"ratio min/median/max {ratio['min']:.3f} / {ratio['median']:.3f} / {ratio['max']:.3f}; "
        f"netloader {rate['min']:.3f} / {rate['median']:.3f} / {rate['max']:.3f} GiB/s"
    )
    print(
        f"CPU s per GiB (median): netloader client {cpu['client']['median']:.3f}, source "
        f"{cpu['source']['median']:.3f}; raw TCP client {raw_cpu['client']:.3f}, source "
        f"{raw_cpu['source']:.3f}"
    )
    print(
        f"bare Gloo (the same buckets, nothing else): {min(gloo_rate):.3f} / "
        f"{statistics.median(gloo_rate):.3f} / {max(gloo_rate):.3f} GiB/s, group setup "
        f"{statistics.median(r['setup_s'] for r in glooes) * 1000:.0f} ms; over raw TCP (same "
        f"moment) {gloo_to_raw['min']:.3f} / {gloo_to_raw['median']:.3f} / {gloo_to_raw['max']:.3f}; "
        f"netloader over it {to_gloo['min']:.3f} / {to_gloo['median']:.3f} / {to_gloo['max']:.3f}; "
        f"CPU s per GiB client {gloo_cpu['client']:.3f}, source {gloo_cpu['source']:.3f}"
    )
    growth = result["rss_after_fetch"] - result["rss_allocated"]
    two_buckets = 2 * (bucket_mb << 20)
    print(
        f"client peak RSS: {result['rss_after_fetch'] / GIB:.3f} GiB; weights "
        f"{result['weights'] / GIB:.3f} GiB; process baseline {result['rss_before'] / GIB:.3f} GiB; "
        f"growth during fetch {growth / (1 << 20):.1f} MiB (budget: two buckets = "
        f"{two_buckets / (1 << 20):.0f} MiB)"
    )
    return {
        "bytes": nbytes,
        "tensors": result["tensors"],
        "runs": len(runs),
        "seconds": round(statistics.median(r["seconds"] for r in runs), 4),
        "gib_s": round(rate["median"], 4),
        "raw_tcp_gib_s": round(statistics.median(r["raw_gib_s"] for r in runs), 4),
        "ratio": round(ratio["min"], 4),
        "ratio_median": round(ratio["median"], 4),
        "ratio_max": round(ratio["max"], 4),
        "ratios": [round(r["ratio"], 4) for r in runs],
        "overhead_s": round(statistics.median(r["handshake_s"] + r["setup_s"] for r in runs), 4),
        "client_cpu_s_per_gib": round(cpu["client"]["median"], 4),
        "source_cpu_s_per_gib": round(cpu["source"]["median"], 4),
        "raw_client_cpu_s_per_gib": round(raw_cpu["client"], 4),
        "raw_source_cpu_s_per_gib": round(raw_cpu["source"], 4),
        "bare_gloo_gib_s": round(statistics.median(gloo_rate), 4),
        "bare_gloo_to_raw": {k: round(v, 4) for k, v in gloo_to_raw.items()},
        "netloader_to_bare_gloo": {k: round(v, 4) for k, v in to_gloo.items()},
        "bare_gloo_client_cpu_s_per_gib": round(gloo_cpu["client"], 4),
        "bare_gloo_source_cpu_s_per_gib": round(gloo_cpu["source"], 4),
        "load_avg": [round(r["load"], 2) for r in runs],
        "client_peak_rss_bytes": result["rss_after_fetch"],
        "client_rss_growth_during_fetch_bytes": growth,
        "weights_bytes": result["weights"],
        "two_buckets_bytes": two_buckets,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=1025, help="weights size in MiB")
    parser.add_argument("--bucket-mb", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3, help="netloader runs (raw TCP: +1)")
    parser.add_argument("--bucket-timeout", type=float, default=120.0)
    parser.add_argument("--debug", action="store_true", help="per-bucket timings on stderr")
    bench_reshard.add_arguments(parser, prefix="reshard-")  # --reshard-mib 0: skip the case
    args = parser.parse_args()
    print(f"load average at start: {load_average():.2f}")
    summary = summarize(run_benchmark(args), args.bucket_mb)
    if args.reshard_mib:
        summary.update(bench_reshard.run(argparse.Namespace(
            mib=args.reshard_mib, rounds=args.reshard_rounds, bucket_mb=args.bucket_mb)))
    print(orjson.dumps(summary).decode())


if __name__ == "__main__":
    main()
