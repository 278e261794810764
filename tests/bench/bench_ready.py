"""Time to ready, not only time to weights: whole vLLM starts, default compilation.

Per repetition, in one run:
  (a) A starts from disk with empty caches (a cache root of its own), joins a mesh;
  (b) B starts with empty caches of its own and takes weights and compile cache from A
      through the mesh;
  (c) the floor: B restarted on its now warm cache root, weights from its local disk
      (page cache warm), compile cache local.
Each start is timed from process start to API ready (/health 200) and to the first
token (a one-token completion sent as soon as the server is ready), and split into
phases from its log (each line stamped as it is written). Reports (b)/(c) and (a)/(b),
min/median/max over the repetitions.

    python -m tests.bench.bench_ready [--repetitions 3] [--layers 4]

The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson

from mesh.security import write_secret_file
from tests.support.tiny_checkpoint import CheckpointSpec, build_checkpoint
from tests.support.vllm_process import RESULT_LINE, VllmServer, cpu_server_env, free_port

# Log markers, in the order a start passes them: (phase that ends there, substring).
MARKERS = (
    ("api_imports", "non-default args"),  # the API server process has imported vLLM
    ("inspect_model", "Resolved architecture"),  # vLLM inspected the model class
    ("engine_start", "Initializing a V1 LLM engine"),  # the engine core process is up
    ("worker_start_and_load", "netloader result:"),  # the worker loaded its weights
    ("compile", "Initial profiling/warmup run took"),  # torch.compile (or its cache)
    ("kv_cache_and_warmup", "init engine (profile, create kv cache, warmup model) took"),
    ("api_server", None),  # until /health answers
)


class TimedServer(VllmServer):
    """A VllmServer whose log lines are stamped (monotonic seconds since start)."""

    def start(self) -> TimedServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.t0 = time.monotonic()
        self.stamps: list[tuple[float, str]] = []
        self.proc = subprocess.Popen(
            self.command(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=cpu_server_env(self.env), start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        with open(self.log_path, "wb") as log:
            for raw in self.proc.stdout:
                self.stamps.append((time.monotonic() - self.t0, raw.decode(errors="replace")))
                log.write(raw)
                log.flush()

    def timed_start(self) -> dict:
        """Start, wait until ready, ask for one token; the timings and phases."""
        self.start().wait_ready(900)
        ready_s = time.monotonic() - self.t0
        self.complete("Hello world", max_tokens=1, logprobs=None)
        first_token_s = time.monotonic() - self.t0
        return {"ready_s": ready_s, "first_token_s": first_token_s,
                "phases": self.phases(ready_s), "result": self.result_lines()}

    def phases(self, ready_s: float) -> dict[str, float]:
        phases, last = {}, 0.0
        for phase, marker in MARKERS:
            at = ready_s if marker is None else next(
                (t for t, line in self.stamps if marker in line), None)
            if at is None:
                continue
            phases[phase] = round(at - last, 2)
            last = at
        return phases

    def result_lines(self) -> list[dict]:
        return [json.loads(m.group(1)) for _, line in self.stamps
                if (m := RESULT_LINE.search(line.rstrip("\n")))]


def repetition(model: str, work: Path, secret: str, index: int) -> dict:
    shutil.rmtree(work, ignore_errors=True)
    gossip = f"127.0.0.1:{free_port()}"

    def server(name, root, extra_config):
        return TimedServer(model=model, log_path=work / f"{name}.log", enforce_eager=False,
                           env={"VLLM_CACHE_ROOT": str(work / root)}, extra_config=extra_config,
                           extra_args=["--shutdown-timeout", "5"])

    mesh = {"secret_file": secret, "wait_timeout_s": 10}
    a = server("A", "root-a", {"mesh": {**mesh, "bind": gossip, "name": f"A{index}"},
                               "listen_host": "127.0.0.1"})
    b = server("B", "root-b", {"mesh": {**mesh, "seeds": [gossip], "name": f"B{index}"},
                               "listen_host": "127.0.0.1"})
    floor = server("B-restart", "root-b", {})  # plain netloader: local disk, local caches
    try:
        cold = a.timed_start()
        _wait_for(lambda: any("offered to peers" in line for _, line in a.stamps), 120)
        peer = b.timed_start()
        b.stop()
        warm = floor.timed_start()
    finally:
        for s in (floor, b, a):
            s.stop()
    run = {"cold_disk": cold, "peer": peer, "warm_floor": warm}
    for name, timing in run.items():
        [result] = timing.pop("result") or [{}]
        timing["source"], timing["compile_cache"] = result.get("source"), result.get("compile_cache")
        timing["load_s"] = result.get("seconds")
        print(f"  rep {index} {name:10s} ready {timing['ready_s']:6.2f}s  first token "
              f"{timing['first_token_s']:6.2f}s  weights {timing['source']}  compile cache "
              f"{timing['compile_cache']}  phases {timing['phases']}", flush=True)
    return run


def _wait_for(condition, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the source never offered its compile cache")
        time.sleep(0.2)


def spread(values: list[float]) -> dict[str, float]:
    return {"min": round(min(values), 3), "median": round(statistics.median(values), 3),
            "max": round(max(values), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--out", default="out/bench_ready")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    spec = CheckpointSpec(hidden=args.hidden, layers=args.layers, intermediate=args.hidden * 11 // 4,
                          kv_heads=2, vocab=args.vocab, seed=7)
    model = str(build_checkpoint(out / "checkpoint", spec))
    mib = sum(f.stat().st_size for f in Path(model).glob("*.safetensors")) / (1 << 20)
    secret = str(out / "cluster.secret")
    if not os.path.exists(secret):
        write_secret_file(secret)
    started = time.monotonic()
    print(f"bench-ready: checkpoint {mib:.0f} MiB, {args.repetitions} repetitions", flush=True)
    runs = [repetition(model, out / f"rep{i}", secret, i) for i in range(args.repetitions)]

    def values(case, key):
        return [r[case][key] for r in runs]

    per_run = {
        "peer_over_floor": [r["peer"]["ready_s"] / r["warm_floor"]["ready_s"] for r in runs],
        "cold_over_peer": [r["cold_disk"]["ready_s"] / r["peer"]["ready_s"] for r in runs],
        "peer_over_floor_first_token": [
            r["peer"]["first_token_s"] / r["warm_floor"]["first_token_s"] for r in runs],
    }
    median_run = sorted(runs, key=lambda r: r["peer"]["ready_s"] / r["warm_floor"]["ready_s"])[
        len(runs) // 2]
    summary = {
        "checkpoint_mib": round(mib, 1),
        "repetitions": args.repetitions,
        "cold_disk_ready_s": spread(values("cold_disk", "ready_s"))["median"],
        "peer_ready_s": spread(values("peer", "ready_s"))["median"],
        "warm_floor_ready_s": spread(values("warm_floor", "ready_s"))["median"],
        "cold_disk_first_token_s": spread(values("cold_disk", "first_token_s"))["median"],
        "peer_first_token_s": spread(values("peer", "first_token_s"))["median"],
        "warm_floor_first_token_s": spread(values("warm_floor", "first_token_s"))["median"],
        "peer_over_floor": spread(per_run["peer_over_floor"])["median"],
        "cold_over_peer": spread(per_run["cold_over_peer"])["median"],
        "spread": {k: spread(v) for k, v in per_run.items()},
        "compile_cache": sorted({r["peer"]["compile_cache"] for r in runs}),
        "weights": sorted({r["peer"]["source"] for r in runs}),
        "phases": {case: median_run[case]["phases"] for case in ("cold_disk", "peer", "warm_floor")},
        "bench_seconds": round(time.monotonic() - started, 1),
        "load_average": os.getloadavg()[0],
    }
    print(orjson.dumps(summary).decode())


if __name__ == "__main__":
    sys.exit(main())
