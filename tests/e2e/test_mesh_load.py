"""A starting instance finds a running one through the gossip mesh, with nothing but a seed."""

import json
import subprocess
import sys
import time

import pytest

from loader.integration.vllm_compat import VLLM_VERSION
from mesh.security import write_secret_file
from tests.support.tiny_checkpoint import CheckpointSpec, build_checkpoint
from tests.support.vllm_process import VllmServer, free_port

pytestmark = pytest.mark.e2e

PROMPTS = ["Hello world", "Once upon a time", "The quick brown fox"]


def _logprobs(server):
    return [server.complete(p, max_tokens=6, logprobs=5)["logprobs"] for p in PROMPTS]


def _mesh_status(seed: str, secret: str) -> list[dict]:
    out = subprocess.run(
        [sys.executable, "-m", "mesh.cli", "status", "--seeds", seed, "--secret-file", secret,
         "--json"], capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def instance_a(tiny_checkpoint, secret, tmp_path_factory):
    gossip = f"127.0.0.1:{free_port()}"
    server = VllmServer(
        model=tiny_checkpoint, log_path=tmp_path_factory.mktemp("a") / "A.log",
        extra_config={"mesh": {"bind": gossip, "secret_file": secret, "name": "A"},
                      "listen_host": "127.0.0.1"},
    )
    server.gossip = gossip
    server.start().wait_ready()
    yield server
    server.stop()


def _only_result(server) -> dict:
    """Wait for a started server, return its single result line, stop it."""
    try:
        server.wait_ready()
        [result] = server.result_lines()
        return result
    finally:
        server.stop()


def _start_b(model, log_path, mesh, extra_args=(), env=None, **extra):
    return VllmServer(model=model, log_path=log_path, extra_args=list(extra_args), env=env,
                      extra_config={"mesh": {"wait_timeout_s": 5, **mesh}, **extra}).start()


@pytest.mark.compat
def test_b_finds_a_through_the_mesh_and_answers_identically(instance_a, tiny_checkpoint, secret,
                                                             tmp_path):
    members = _mesh_status(instance_a.gossip, secret)
    [a] = [m for m in members if m["name"] == "A-r0"]
    assert a["state"] == "alive" and a["meta"]["ready"] is True
    assert a["meta"]["state"] == "complete" and a["meta"]["progress"] == 1.0  # loaded from disk
    assert a["meta"]["role"] == "vllm-worker" and a["meta"]["tp"] == 1
    assert a["meta"]["vllm"] == VLLM_VERSION  # `mesh status` shows the version in use
    b = _start_b(tiny_checkpoint, tmp_path / "B.log",
                 {"seeds": [instance_a.gossip], "secret_file": secret, "name": "B"},
                 # a shutdown grace lets the worker leave the mesh; vLLM's default SIGKILLs it
                 extra_args=["--shutdown-timeout", "5"])
    try:
        b.wait_ready()
        [result] = b.result_lines()
        assert result["source"] == "peer", result
        assert result["peer"] == a["meta"]["endpoint"]
        assert result["vllm"] == VLLM_VERSION
        assert _logprobs(b) == _logprobs(instance_a)
        names = {m["name"]: m for m in _mesh_status(instance_a.gossip, secret)}
        assert names["B-r0"]["meta"]["ready"] is True
    finally:
        b.stop()
    # the worker leaves as its process exits, which may be just after the API server's exit
    deadline = time.monotonic() + 15
    while True:
        states = {m["name"]: m["state"] for m in _mesh_status(instance_a.gossip, secret)}
        if states.get("B-r0") == "left" or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert states.get("B-r0") == "left"


def test_wrong_secret_never_sees_a_and_falls_back_to_disk(instance_a, tiny_checkpoint, tmp_path):
    wrong = tmp_path / "wrong.secret"
    write_secret_file(str(wrong))
    result = _only_result(_start_b(tiny_checkpoint, tmp_path / "B.log",
                                   {"seeds": [instance_a.gossip], "secret_file": str(wrong)}))
    assert result["source"] == "disk"
    assert "mesh: no mesh member reachable" in result["fallback_reason"]


def test_b_with_another_model_ignores_a(instance_a, secret, tmp_path):
    other = str(build_checkpoint(tmp_path / "other", CheckpointSpec(seed=1)))
    result = _only_result(_start_b(other, tmp_path / "B.log",
                                   {"seeds": [instance_a.gossip], "secret_file": secret}))
    assert result["source"] == "disk"
    assert "no ready peer with this model" in result["fallback_reason"]


def test_unresolvable_seed_falls_back_to_disk(tiny_checkpoint, secret, tmp_path):
    result = _only_result(_start_b(tiny_checkpoint, tmp_path / "B.log",
                                   {"seeds": ["no-such-host.invalid:7946"], "secret_file": secret,
                                    "wait_timeout_s": 3}))
    assert result["source"] == "disk"
    assert "mesh" in result["fallback_reason"]


def test_mesh_without_a_secret_stops_the_engine_naming_the_key(tiny_checkpoint, tmp_path):
    server = _start_b(tiny_checkpoint, tmp_path / "B.log", {"seeds": ["127.0.0.1:9"]},
                      env={"NETLOADER_MESH_SECRET_FILE": ""})
    try:
        with pytest.raises(RuntimeError, match="exited"):
            server.wait_ready(timeout_s=180)
        log = server.log_text()
        assert "mesh.secret_file" in log and "mesh keygen" in log and '"insecure": true' in log
        assert not server.result_lines()  # refused before any weight was loaded
    finally:
        server.stop()


def test_a_killed_before_b_starts_b_falls_back(tiny_checkpoint, secret, tmp_path):
    gossip = f"127.0.0.1:{free_port()}"
    a = VllmServer(model=tiny_checkpoint, log_path=tmp_path / "A2.log",
                   extra_config={"mesh": {"bind": gossip, "secret_file": secret}}).start()
    a.wait_ready()
    a.kill()
    result = _only_result(_start_b(tiny_checkpoint, tmp_path / "B.log",
                                   {"seeds": [gossip], "secret_file": secret, "wait_timeout_s": 4}))
    assert result["source"] == "disk"
    assert result["lookup_s"] <= 4 + 5  # the configured mesh wait, not a hang


def test_two_starting_together_behind_a_one_client_source_both_load_from_peers(
    tiny_checkpoint, secret, tmp_path
):
    """A serves one client at a time: B and C, started together, either chain (one relays
    to the other while receiving) or take turns at A; both end with A's exact weights."""
    gossip = f"127.0.0.1:{free_port()}"
    a = VllmServer(model=tiny_checkpoint, log_path=tmp_path / "A.log",
                   extra_config={"mesh": {"bind": gossip, "secret_file": secret, "name": "A"},
                                 "max_concurrent_clients": 1})
    starting = [
        VllmServer(model=tiny_checkpoint, log_path=tmp_path / f"{name}.log",
                   extra_config={"mesh": {"seeds": [gossip], "secret_file": secret,
                                          "name": name}, "max_concurrent_clients": 1})
        for name in ("B", "C")
    ]
    try:
        a.start().wait_ready()
        for server in starting:
            server.start()
        for server in starting:
            server.wait_ready()
        members = {m["name"]: m for m in _mesh_status(gossip, secret)}
        endpoints = {members[n]["meta"]["endpoint"]: n for n in ("A-r0", "B-r0", "C-r0")}
        peers = []
        for name, server in zip(("B", "C"), starting, strict=True):
            [result] = server.result_lines()
            assert result["source"] == "peer", result
            peers.append(endpoints[result["peer"]])
            meta = members[f"{name}-r0"]["meta"]
            assert (meta["state"], meta["progress"], meta["capacity"]) == ("complete", 1.0, 1)
            assert "upstream" not in meta  # only advertised while receiving
        assert peers in (["A-r0", "A-r0"], ["A-r0", "B-r0"], ["C-r0", "A-r0"]), peers
        reference = _logprobs(a)
        assert all(_logprobs(server) == reference for server in starting)
    finally:
        for server in (*starting, a):
            server.stop()


TP2 = ["--tensor-parallel-size", "2", "--distributed-executor-backend", "mp"]
# one NUMA node here: vLLM CPU needs each TP worker's OpenMP threads bound by hand
TP2_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}


def test_tp2_each_rank_pulls_its_own_shard_through_the_mesh(tiny_checkpoint, secret, tmp_path):
    gossip = f"127.0.0.1:{free_port()}"
    a = VllmServer(model=tiny_checkpoint, log_path=tmp_path / "A.log", extra_args=TP2,
                   env=TP2_ENV,
                   extra_config={"mesh": {"bind": gossip, "secret_file": secret, "name": "A"}})
    b = VllmServer(model=tiny_checkpoint, log_path=tmp_path / "B.log", extra_args=TP2,
                   env=TP2_ENV,
                   extra_config={"mesh": {"seeds": [gossip], "secret_file": secret, "name": "B"}})
    try:
        a.start().wait_ready()
        b.start().wait_ready()
        a_by_rank = {r["rank"]: r for r in a.result_lines()}
        b_by_rank = {r["rank"]: r for r in b.result_lines()}
        assert sorted(b_by_rank) == [0, 1]
        a_endpoints = {m["name"]: m["meta"]["endpoint"] for m in _mesh_status(gossip, secret)
                       if m["name"].startswith("A-r")}
        for rank in (0, 1):
            assert b_by_rank[rank]["source"] == "peer", b_by_rank[rank]
            assert b_by_rank[rank]["peer"] == a_endpoints[f"A-r{rank}"]
            assert b_by_rank[rank]["bytes"] == a_by_rank[rank]["bytes"]
        assert _logprobs(b) == _logprobs(a)
    finally:
        b.stop()
        a.stop()
