"""Compile artifacts move with the weights: vLLM's default compilation (no
--enforce-eager), each instance with a cache root of its own."""

from __future__ import annotations

import os
import time

import pytest

from loader.integration import compile_cache
from mesh.security import write_secret_file
from tests.support.vllm_process import VllmServer, free_port

pytestmark = pytest.mark.e2e

PROMPTS = ["Hello world", "Once upon a time"]
KERNEL_SUFFIXES = (".so", ".cpp", ".py")  # what inductor generates and compiles


def _kernels(root) -> set[str]:
    """Compiled kernels (generated sources and shared objects) under a cache root."""
    found = set()
    for dirpath, _, names in os.walk(os.path.join(root, "torch_compile_cache")):
        for name in names:
            if name.endswith(KERNEL_SUFFIXES) and "inductor_cache" in dirpath:
                found.add(os.path.relpath(os.path.join(dirpath, name), root))
    return found


def _replace(path: str, data: bytes) -> None:
    """New content under `path` with the old size and times (silent corruption: the
    source does not list it again), as a new file: A keeps its mapped kernels intact."""
    st = os.stat(path)
    tmp = path.split("torch_compile_cache")[0] + "replacing.tmp"  # outside what A lists
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(tmp, path)


def _logprobs(server):
    return [server.complete(p, max_tokens=4, logprobs=5)["logprobs"] for p in PROMPTS]


@pytest.fixture(scope="module")
def secret(tmp_path_factory):
    path = tmp_path_factory.mktemp("secret") / "cluster.secret"
    write_secret_file(str(path))
    return str(path)


def _instance(name, model, tmp, secret, mesh, extra_args=()):
    root = tmp / f"cache-{name}"
    server = VllmServer(
        model=model, log_path=tmp / f"{name}.log", enforce_eager=False,
        extra_args=list(extra_args), env={"VLLM_CACHE_ROOT": str(root)},
        extra_config={"mesh": {"secret_file": secret, "name": name, "wait_timeout_s": 10, **mesh},
                      "listen_host": "127.0.0.1"},
    )
    server.cache_root = str(root)
    return server


@pytest.fixture(scope="module")
def instance_a(tiny_checkpoint, secret, tmp_path_factory):
    gossip = f"127.0.0.1:{free_port()}"
    a = _instance("A", tiny_checkpoint, tmp_path_factory.mktemp("a"), secret, {"bind": gossip})
    a.gossip = gossip
    a.start().wait_ready()
    a.kernels = _kernels(a.cache_root)  # before any request: what its warm-up compiled
    yield a
    a.stop()


def _wait_offered(a, timeout_s=120.0):
    """Until A offers its entry and has not listed it again for a while: a request that
    made vLLM compile more (the sampler, on the first requests) is in the offer."""
    deadline = time.monotonic() + timeout_s
    listed, since = -1, time.monotonic()
    while True:
        count = a.log_text().count("offered to peers")
        if count != listed:
            listed, since = count, time.monotonic()
        if count and time.monotonic() - since > 2.5 * compile_cache.REFRESH_S:
            return
        assert time.monotonic() < deadline, a.log_tail()
        time.sleep(0.5)


def test_b_takes_the_compile_cache_from_the_peer_and_compiles_no_kernel(
    instance_a, tiny_checkpoint, secret, tmp_path
):
    assert instance_a.kernels, "A compiled nothing: is compilation on?"
    [a_result] = instance_a.result_lines()
    assert a_result["compile_cache"] == "none: no peer offers this compile key"
    _wait_offered(instance_a)
    b = _instance("B", tiny_checkpoint, tmp_path, secret, {"seeds": [instance_a.gossip]}).start()
    try:
        b.wait_ready()
        [result] = b.result_lines()
        assert result["source"] == "peer" and result["compile_cache"] == "peer", result
        # B's warm-up compiled nothing of its own: every kernel it holds came from A
        assert _kernels(b.cache_root) == instance_a.kernels
        # and vLLM's API server found the model class inspected already (by A)
        assert "1 of 1 model inspection results from" in b.log_text()
        assert _logprobs(b) == _logprobs(instance_a)
    finally:
        b.stop()


def test_an_entry_corrupted_on_the_source_is_refused_and_the_instance_compiles_itself(
    instance_a, tiny_checkpoint, secret, tmp_path
):
    _wait_offered(instance_a)
    originals = {}
    for path in sorted(instance_a.kernels):  # wrong bytes in every 4 KiB of every kernel
        full = os.path.join(instance_a.cache_root, path)
        data = open(full, "rb").read()
        originals[full] = data
        corrupt = bytearray(data)
        for i in range(0, len(corrupt), 4096):
            corrupt[i] ^= 0xFF
        _replace(full, bytes(corrupt))
    c = _instance("C", tiny_checkpoint, tmp_path, secret, {"seeds": [instance_a.gossip]}).start()
    try:
        try:
            c.wait_ready()
        finally:  # before A answers anything: it may load kernels from its cache then
            for full, data in originals.items():
                _replace(full, data)
        [result] = c.result_lines()
        assert result["source"] == "peer", result
        assert result["compile_cache"].startswith("none: "), result
        assert "checksum mismatch in torch_compile_cache/" in result["compile_cache"], result
        assert _kernels(c.cache_root)  # it compiled its own
        assert _logprobs(c) == _logprobs(instance_a)
    finally:
        c.stop()


def test_another_config_hash_is_refused_naming_it(instance_a, tiny_checkpoint, secret, tmp_path):
    _wait_offered(instance_a)
    d = _instance("D", tiny_checkpoint, tmp_path, secret, {"seeds": [instance_a.gossip]},
                  extra_args=["--max-num-seqs", "4"]).start()  # in vLLM's config hash
    try:
        d.wait_ready()
        [result] = d.result_lines()
        assert result["source"] == "peer", result  # the weights are the same
        assert "compile key differs: config_hash " in result["compile_cache"], result
        assert _logprobs(d) == _logprobs(instance_a)
    finally:
        d.stop()
