"""bench-transfer's resharding case: a rank pulls its shard from source ranks of another
tensor-parallel shape, against the same-shape transfer of the same bytes, in one run.

A source process serves a decoder (fused QKV with 4 KV heads for 16 query heads, gate/up,
row-parallel o/down, padded vocabulary) as a TP=1 instance and as the two ranks of a TP=2
instance. The client then runs, alternating, (a) TP=1 from TP=1 and TP=1 resharded from
both TP=2 ranks (the whole model either way), (b) TP=2 rank 0 from TP=2 rank 0 and TP=2
rank 0 resharded from TP=1 (half of it). Bytes are counted where they are sent: the
ratio moved / shard must be 1.

    python -m tests.bench.bench_reshard [--mib 256] [--bucket-mb 64]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time

import orjson
import torch

GIB = float(1 << 30)


def spec_for(mib: int):
    from tests.transfer.sharded_model import ModelSpec

    per_layer = (16 + 8) * 64 * 1024 + 1024 * 1024 + 3 * 1024 * 2816 + 1024  # floats
    vocab = 8_000
    layers = max(1, ((mib << 20) // 4 - 2 * vocab * 1024) // per_layer)
    return ModelSpec(layers=layers, heads=16, kv_heads=4, head_dim=64, intermediate=2816,
                     vocab=vocab, pad=64, tied=False, qkv_bias=False)


def _shape_fingerprint(tp: int, rank: int) -> str:
    return f"{tp:02x}{rank:02x}" * 16


def source_main(args, to_parent, from_parent) -> None:
    torch.set_num_threads(1)
    import vllm.distributed.utils  # noqa: F401  (import cost is not part of a transfer)

    from loader.config import TransferSettings
    from loader.transfer.bucket_sender import BucketSender
    from loader.transfer.server import WeightServer
    from tests.transfer.sharded_model import full_weights, shard

    sent = [0]

    class Counting(BucketSender):
        def send(self, pg, buckets, device, before_bucket, item_messages=False):
            super().send(pg, buckets, device, before_bucket, item_messages)
            sent[0] += sum(b.nbytes for b in buckets)

    spec = spec_for(args.mib)
    full = full_weights(spec)
    settings = TransferSettings(bucket_mb=args.bucket_mb, bucket_timeout_s=120.0)
    endpoints = {}
    servers = []
    for tp, rank in ((1, 0), (2, 0), (2, 1)):
        tensors, layout = shard(spec, full, tp, 1, rank)
        server = WeightServer(tensors, _shape_fingerprint(tp, rank), rank, settings,
                              host="127.0.0.1", layout=layout, sender_cls=Counting)
        server.start()
        server.wait_ready(600)
        servers.append(server)
        endpoints[f"tp{tp}r{rank}"] = server.endpoint
    del full
    to_parent.put(endpoints)
    while (msg := from_parent.get(timeout=1800)) != "stop":
        assert msg == "sent?"
        to_parent.put(sent[0])
        sent[0] = 0
    for server in servers:
        server.stop()


def client_main(args, endpoints, to_source, from_source, to_parent) -> None:
    torch.set_num_threads(1)
    import vllm.distributed.utils  # noqa: F401

    from loader.config import TransferSettings
    from loader.transfer.client import fetch_from_sources
    from loader.transfer.reshard_client import fetch_resharded
    from tests.transfer.sharded_model import full_weights, shard

    spec = spec_for(args.mib)
    full = full_weights(spec)
    settings = TransferSettings(bucket_mb=args.bucket_mb, bucket_timeout_s=120.0)
    cases = {}
    for tp, sources in ((1, ["tp2r0", "tp2r1"]), (2, ["tp1r0"])):
        expected, layout = shard(spec, full, tp, 1, 0)
        dest = {n: torch.zeros_like(t) for n, t in expected.items()}
        shard_bytes = sum(t.numel() * t.element_size() for t in expected.values())
        rounds = []
        for _ in range(args.rounds):
            for kind in ("same", "reshard"):
                for t in dest.values():
                    t.zero_()
                t0 = time.perf_counter()
                if kind == "same":
                    outcome = fetch_from_sources([endpoints[f"tp{tp}r0"]], _shape_fingerprint(tp, 0),
                                                 dest, 0, settings)
                else:
                    outcome = fetch_resharded([endpoints[s] for s in sources], layout, dest, 0, settings)
                seconds = time.perf_counter() - t0
                to_source.put("sent?")
                sent = from_source.get(timeout=60)
                identical = all(torch.equal(dest[n], t) for n, t in expected.items())
                if not outcome.ok or not identical:
                    raise SystemExit(f"{kind} tp{tp}: {outcome.failures} identical={identical}")
                rounds.append({"kind": kind, "seconds": seconds, "sent": sent})
        cases[f"to_tp{tp}"] = {"shard_bytes": shard_bytes, "rounds": rounds,
                               "sources": len(sources)}
    to_parent.put(cases)


def run(args) -> dict:
    """Both directions; returns the figures (printed as it goes)."""
    ctx = mp.get_context("spawn")
    from_source, to_source, from_client = ctx.Queue(), ctx.Queue(), ctx.Queue()
    source = ctx.Process(target=source_main, args=(args, from_source, to_source), daemon=True)
    source.start()
    endpoints = from_source.get(timeout=900)
    client = ctx.Process(target=client_main,
                         args=(args, endpoints, to_source, from_source, from_client), daemon=True)
    client.start()
    cases = from_client.get(timeout=1800)
    client.join(60)
    to_source.put("stop")
    source.join(60)
    figures = {}
    for name, case in cases.items():
        best = {k: min((r for r in case["rounds"] if r["kind"] == k), key=lambda r: r["seconds"])
                for k in ("same", "reshard")}
        ratio = best["reshard"]["sent"] / case["shard_bytes"]
        slowdown = best["reshard"]["seconds"] / best["same"]["seconds"]
        print(
            f"reshard {'TP=2 -> TP=1' if name == 'to_tp1' else 'TP=1 -> TP=2 rank 0'}: "
            f"shard {case['shard_bytes'] / GIB:.3f} GiB from {case['sources']} source rank(s), "
            f"sent {best['reshard']['sent'] / GIB:.3f} GiB (ratio {ratio:.3f}); "
            f"{best['reshard']['seconds']:.2f}s vs same-shape {best['same']['seconds']:.2f}s "
            f"for the same bytes ({slowdown:.2f}x); rounds: "
            + ", ".join(f"{r['kind']} {r['seconds']:.2f}s" for r in case["rounds"])
        )
        figures[f"reshard_{name}_bytes_ratio"] = round(ratio, 4)
        figures[f"reshard_{name}_seconds"] = round(best["reshard"]["seconds"], 4)
        figures[f"reshard_{name}_same_shape_seconds"] = round(best["same"]["seconds"], 4)
        figures[f"reshard_{name}_time_ratio"] = round(slowdown, 4)
    return figures


def add_arguments(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    parser.add_argument(f"--{prefix}mib", type=int, default=256, help="model size in MiB")
    parser.add_argument(f"--{prefix}rounds", type=int, default=2, help="rounds of each kind")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("--bucket-mb", type=int, default=64)
    args = parser.parse_args()
    print(orjson.dumps(run(args)).decode())


if __name__ == "__main__":
    main()
