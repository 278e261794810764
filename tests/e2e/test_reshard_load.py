"""Instances of another tensor-parallel shape load from each other (resharding), with real
vLLM on CPU, on a checkpoint with one KV head for four query heads (so TP=2 replicates
it), tied embeddings and a padded vocabulary (500 rows, 512 in vLLM's tensors).

A (TP=2) and R (TP=1) load from disk. B (TP=1) finds A through the mesh by its content id
and takes half its shard from each of A's ranks; D (TP=2) is pointed at R by SOURCE and
each of its ranks takes its slices of R's tensors. Each answers with the very logprobs of
the disk-loaded instance of its own shape."""

import json
import subprocess
import sys

import pytest

from tests.support.tiny_checkpoint import CheckpointSpec, build_checkpoint
from tests.support.vllm_process import VllmServer, free_port

pytestmark = pytest.mark.e2e

SPEC = CheckpointSpec(kv_heads=1, tie_embeddings=True, vocab=500)
TP2 = ["--tensor-parallel-size", "2", "--distributed-executor-backend", "mp"]
TP2_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}  # one NUMA node: bind each worker by hand
PROMPTS = ["Hello world", "Once upon a time", "The quick brown fox"]


def _logprobs(server):
    return [server.complete(p, max_tokens=6, logprobs=5)["logprobs"] for p in PROMPTS]


def _by_rank(server) -> dict[int, dict]:
    return {r["rank"]: r for r in server.result_lines()}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(build_checkpoint(tmp_path_factory.mktemp("ckpt") / "gqa-tied", SPEC))


@pytest.fixture(scope="module")
def tp2_source(checkpoint, secret, tmp_path_factory):
    gossip = f"127.0.0.1:{free_port()}"
    server = VllmServer(
        model=checkpoint, log_path=tmp_path_factory.mktemp("a") / "A.log", extra_args=TP2,
        env=TP2_ENV,
        extra_config={"mesh": {"bind": gossip, "secret_file": secret, "name": "A"},
                      "listen_host": "127.0.0.1"},
    )
    server.gossip = gossip
    server.start().wait_ready()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tp1_source(checkpoint, secret, tmp_path_factory):
    port = free_port()
    server = VllmServer(
        model=checkpoint, log_path=tmp_path_factory.mktemp("r") / "R.log",
        extra_config={"LISTEN_PORT": port, "secret_file": secret, "listen_host": "127.0.0.1"},
        listen_port=port,
    )
    server.start().wait_ready()
    yield server
    server.stop()


def _mesh_endpoints(seed: str, secret: str) -> dict[str, str]:
    out = subprocess.run(
        [sys.executable, "-m", "mesh.cli", "status", "--seeds", seed, "--secret-file", secret,
         "--json"], capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return {m["name"]: m["meta"]["endpoint"] for m in json.loads(out.stdout)}


def test_tp1_takes_its_weights_from_both_ranks_of_a_tp2_instance(tp2_source, tp1_source,
                                                                  checkpoint, secret, tmp_path):
    a = _by_rank(tp2_source)
    assert [a[r]["source"] for r in (0, 1)] == ["disk", "disk"]
    endpoints = _mesh_endpoints(tp2_source.gossip, secret)
    with VllmServer(
        model=checkpoint, log_path=tmp_path / "B.log",
        extra_config={"mesh": {"seeds": [tp2_source.gossip], "secret_file": secret, "name": "B",
                               "wait_timeout_s": 5}},
    ) as b:
        b.wait_ready()
        [result] = b.result_lines()
        assert result["source"] == "peer", result
        assert sorted(result["peers"]) == sorted([endpoints["A-r0"], endpoints["A-r1"]])
        # exactly its shard moved: the whole model, what R read from disk
        assert result["bytes"] == _by_rank(tp1_source)[0]["bytes"]
        assert _logprobs(b) == _logprobs(tp1_source)


def test_tp2_ranks_take_their_slices_of_a_tp1_instance_by_source(tp2_source, tp1_source,
                                                                 checkpoint, secret, tmp_path):
    source = f"127.0.0.1:{tp1_source.listen_port}"
    with VllmServer(
        model=checkpoint, log_path=tmp_path / "D.log", extra_args=TP2, env=TP2_ENV,
        extra_config={"SOURCE": [{"device_id": r, "sources": [source]} for r in (0, 1)],
                      "secret_file": secret},
    ) as d:
        d.wait_ready()
        results, reference = _by_rank(d), _by_rank(tp2_source)
        for rank in (0, 1):
            assert results[rank]["source"] == "peer", results[rank]
            assert results[rank]["peers"] == [source]
            assert results[rank]["bytes"] == reference[rank]["bytes"]  # its shard, no more
        assert _logprobs(d) == _logprobs(tp2_source)
