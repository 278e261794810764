"""Loaded by every Python process of the vLLM source that bench_source starts (its
PYTHONPATH leads here): once the worker's WeightServer exists, write what it serves
(fingerprint, manifest, the CPUs the worker is pinned to) to $NETLOADER_BENCH_SERVED, so that the benchmark's plain client
can ask for exactly those tensors. With $NETLOADER_BENCH_NO_YIELD set, session threads
keep normal priority (to measure what yield_to_inference buys); with
$NETLOADER_BENCH_MODEL_CORES set, they stay on the model runner's cores (nice 19 only). Nothing else changes."""

import os

_path = os.environ.get("NETLOADER_BENCH_SERVED")
if _path:
    try:
        import orjson

        from loader.transfer import server as _server

        _init = _server.WeightServer.__init__

        def _record(self, tensors, fingerprint, rank, *args, **kwargs):
            _init(self, tensors, fingerprint, rank, *args, **kwargs)
            record = {"fingerprint": fingerprint, "rank": rank, "manifest": self._manifest.to_wire(),
                      "worker_cpus": sorted(os.sched_getaffinity(0))}
            with open(f"{_path}.tmp", "wb") as fh:
                fh.write(orjson.dumps(record))
            os.replace(f"{_path}.tmp", _path)

        _server.WeightServer.__init__ = _record
        if os.environ.get("NETLOADER_BENCH_NO_YIELD"):  # the A/B run: serve at normal priority
            _server.yield_to_inference = lambda *cpus: None
        if os.environ.get("NETLOADER_BENCH_MODEL_CORES"):  # the A/B run: nice 19 on the model's cores
            from loader.transfer import inference_yield as _yield

            _yield.spare_cpus = lambda pid, parent: set()
    except Exception as exc:  # never break the interpreter that imports us
        print(f"bench source hook not installed: {exc}")
