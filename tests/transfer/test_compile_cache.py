"""Compile cache entries between a real weight server and the cache client, on loopback:
verified, atomic, never overwriting, refused with a reason, and only between
authenticated peers."""

from __future__ import annotations

import dataclasses
import os
import time

import pytest
import torch

from loader.transfer import cache_wire
from loader.transfer.cache_client import fetch_cache
from loader.transfer.cache_files import list_entry
from loader.transfer.cache_source import NEEDS_SECRET, NOT_YET, ServedCache
from loader.transfer.checksum import checksum_key
from mesh.security import load_cluster_keys, write_secret_file
from tests.transfer.helpers import FAST, in_process_server

ENTRY = "torch_compile_cache/torch_aot_compile/0123abcd"
KEY = "5e" * 16
FACTORS = {"vllm": "0.32.0", "torch": "2.13.0+cpu", "config_hash": "c0ffee", "rank": "rank_0_0"}
SETTINGS = dataclasses.replace(FAST, compile_cache_timeout_s=20.0)


@pytest.fixture
def keys(tmp_path):
    path = str(tmp_path / "secret")
    write_secret_file(path)
    return load_cluster_keys(path)


def _write_entry(root) -> dict[str, bytes]:
    """A source's entry: this rank's artifact, shared kernels (one of 9 MiB: several
    chunks), and another rank's artifact that is not this rank's to offer."""
    files = {
        f"{ENTRY}/rank_0_0/model": os.urandom(300_000),
        f"{ENTRY}/inductor_cache/ab/cabc.main.so": os.urandom(9 << 20),
        f"{ENTRY}/inductor_cache/ab/cabc.main.cpp": b"// kernel\n" * 100,
        f"{ENTRY}/inductor_cache/locks/cabc.lock": b"",
        f"{ENTRY}/rank_1_0/model": os.urandom(1000),
    }
    for path, data in files.items():
        full = os.path.join(root, *path.split("/"))
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "wb") as fh:
            fh.write(data)
    return files


def _served(root, keys, key=KEY, factors=FACTORS) -> ServedCache:
    listing = list_entry(str(root), [ENTRY], {f"{ENTRY}/rank_1_0"}, checksum_key(keys), 1 << 30)
    return ServedCache(str(root), cache_wire.CacheOffer(key, factors, (ENTRY,), listing))


def _tree(root) -> dict[str, bytes]:
    found = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            full = os.path.join(dirpath, name)
            found[os.path.relpath(full, root).replace(os.sep, "/")] = open(full, "rb").read()
    return found


def _fetch(server, root, keys, key=KEY, factors=FACTORS):
    return fetch_cache(server.endpoint, key, factors, str(root), SETTINGS, keys,
                       time.monotonic() + SETTINGS.compile_cache_timeout_s)


def _server(keys, served=None):
    return in_process_server({"w": torch.zeros(4)}, keys=keys, compile_cache=served)


def test_an_entry_moves_verified_and_lands_as_the_source_has_it(tmp_path, keys):
    source_files = _write_entry(tmp_path / "a")
    with _server(keys, _served(tmp_path / "a", keys)) as server:
        fetched = _fetch(server, tmp_path / "b", keys)
    assert fetched.failure is None
    assert (fetched.report.installed, fetched.report.kept) == (4, 0)
    expected = {p: d for p, d in source_files.items() if "/rank_1_0/" not in p}
    assert _tree(tmp_path / "b") == expected  # no staging directory left behind


def test_a_source_that_sends_wrong_bytes_in_every_chunk_is_refused_and_nothing_is_written(
    tmp_path, keys
):
    _write_entry(tmp_path / "a")

    class Corrupt(ServedCache):
        def answer(self, msg):
            reply, data = super().answer(msg)
            if data is not None:  # every chunk, with the true checksums in the offer
                data = bytes(b ^ 0x5A for b in data)
            return reply, data

    served = _served(tmp_path / "a", keys)
    with _server(keys, Corrupt(served.root, served.offer)) as server:
        fetched = _fetch(server, tmp_path / "b", keys)
    assert fetched.failure.startswith("entry refused: checksum mismatch in torch_compile_cache/")
    assert _tree(tmp_path / "b") == {}  # nothing installed, no staging left


def test_an_entry_changed_on_the_source_after_listing_is_refused(tmp_path, keys):
    _write_entry(tmp_path / "a")
    served = _served(tmp_path / "a", keys)
    with open(tmp_path / "a" / ENTRY / "rank_0_0" / "model", "r+b") as fh:
        fh.write(b"\0" * 64)  # on disk now, not what the listing's checksum covers
    with _server(keys, served) as server:
        fetched = _fetch(server, tmp_path / "b", keys)
    assert fetched.failure == f"entry refused: checksum mismatch in {ENTRY}/rank_0_0/model"
    assert _tree(tmp_path / "b") == {}


def test_another_compile_key_is_refused_naming_the_first_differing_factor(tmp_path, keys):
    _write_entry(tmp_path / "a")
    theirs = {**FACTORS, "torch": "2.12.0+cpu"}
    with _server(keys, _served(tmp_path / "a", keys, key="77" * 16, factors=theirs)) as server:
        fetched = _fetch(server, tmp_path / "b", keys)
    assert fetched.failure == (
        "compile key differs: torch 2.13.0+cpu here vs 2.12.0+cpu on the peer"
    )
    assert _tree(tmp_path / "b") == {}


def test_an_existing_local_file_is_never_overwritten(tmp_path, keys):
    source_files = _write_entry(tmp_path / "a")
    local = tmp_path / "b" / ENTRY / "rank_0_0" / "model"
    local.parent.mkdir(parents=True)
    local.write_bytes(b"compiled here")
    with _server(keys, _served(tmp_path / "a", keys)) as server:
        fetched = _fetch(server, tmp_path / "b", keys)
    assert fetched.failure is None and (fetched.report.installed, fetched.report.kept) == (3, 1)
    tree = _tree(tmp_path / "b")
    assert tree[f"{ENTRY}/rank_0_0/model"] == b"compiled here"
    kernel = f"{ENTRY}/inductor_cache/ab/cabc.main.so"
    assert tree[kernel] == source_files[kernel]


def test_a_source_without_an_entry_says_so(tmp_path, keys):
    with _server(keys) as server:
        fetched = _fetch(server, tmp_path / "b", keys)
    assert fetched.failure == f"refused: {NOT_YET}"


def test_caches_never_move_without_a_cluster_secret(tmp_path, keys):
    _write_entry(tmp_path / "a")
    with _server(None, _served(tmp_path / "a", keys)) as server:
        # the client refuses to ask...
        assert _fetch(server, tmp_path / "b", None).failure.startswith("no cluster secret")
        # ...and an unauthenticated server refuses to answer whoever asks
        import zmq

        from loader.transfer import protocol
        from loader.transfer.client import open_control_socket
        from mesh.addresses import split_host_port

        context = zmq.Context()
        sock = open_control_socket(context, *split_host_port(server.endpoint), FAST, None)
        sock.send(protocol.encode(cache_wire.get_message(KEY)))
        assert sock.poll(5000)
        reply = protocol.decode(sock.recv(), 1 << 20)
        sock.close(0)
        context.term()
    assert reply == {"type": "nack", "reason": NEEDS_SECRET}
    assert _tree(tmp_path / "b") == {}


def test_a_client_without_the_secret_reads_nothing(tmp_path, keys):
    _write_entry(tmp_path / "a")
    other = tmp_path / "other"
    write_secret_file(str(other))
    with _server(keys, _served(tmp_path / "a", keys)) as server:
        fetched = fetch_cache(server.endpoint, KEY, FACTORS, str(tmp_path / "b"),
                              dataclasses.replace(SETTINGS, handshake_timeout_s=1.0),
                              load_cluster_keys(str(other)), time.monotonic() + 5)
    assert fetched.failure.startswith("timed out") or "ZeroMQ session" in fetched.failure
    assert _tree(tmp_path / "b") == {}


@pytest.mark.parametrize(
    "path",
    ["../etc/passwd", "/etc/passwd", "torch_compile_cache/../x/y", "torch_compile_cache/.x/y",
     "torch_compile_cache/a/../../b", "other/a/b", "torch_compile_cache/a//b",
     "torch_compile_cache/a/b\n", "torch_compile_cache/a/" + "b" * 400],
)
def test_a_listing_naming_a_path_outside_the_cache_is_rejected(path):
    offer = {"type": "cache_offer", "key": KEY, "factors": FACTORS, "entries": [ENTRY],
             "files": [[path, 1, "0" * 64]]}
    with pytest.raises(cache_wire.ProtocolError):
        cache_wire.parse_offer(offer, 1 << 30)


def test_a_listing_above_the_size_limit_or_outside_its_entries_is_rejected():
    file = [f"{ENTRY}/x", 2 << 20, "0" * 64]
    ok = {"type": "cache_offer", "key": KEY, "factors": FACTORS, "entries": [ENTRY], "files": [file]}
    assert cache_wire.parse_offer(ok, 4 << 20).total_bytes == 2 << 20
    with pytest.raises(cache_wire.ProtocolError, match="above the limit"):
        cache_wire.parse_offer(ok, 1 << 20)
    stray = {**ok, "entries": ["torch_compile_cache/other"]}
    with pytest.raises(cache_wire.ProtocolError, match="under no listed entry"):
        cache_wire.parse_offer(stray, 4 << 20)
    twice = {**ok, "files": [file, file]}
    with pytest.raises(cache_wire.ProtocolError, match="listed twice"):
        cache_wire.parse_offer(twice, 8 << 20)


MODEL_INFO = {"hash": "ab" * 32, "modelinfo": {"is_text_generation_model": True,
                                                 "supports_pp": False, "default_pooling_type": None}}
INFO_NAME = "vllm-model_executor-models-llama-LlamaForCausalLM.json"


def test_model_inspection_results_move_and_never_replace_a_local_one(tmp_path, keys):
    from loader.integration.model_info import install
    from loader.transfer.cache_client import fetch_model_infos

    served = ServedCache(str(tmp_path), cache_wire.CacheOffer(KEY, FACTORS),
                         {INFO_NAME: MODEL_INFO, "other.json": MODEL_INFO})
    with _server(keys, served) as server:
        fetched = fetch_model_infos(server.endpoint, SETTINGS, keys, time.monotonic() + 10)
    assert fetched.failure is None and fetched.model_infos[INFO_NAME] == MODEL_INFO
    target = tmp_path / "modelinfos"
    target.mkdir()
    (target / "other.json").write_text("vLLM's own")
    assert install(str(target), fetched.model_infos) == 1
    assert (target / "other.json").read_text() == "vLLM's own"
    import json

    assert json.loads((target / INFO_NAME).read_text()) == MODEL_INFO
    assert sorted(p.name for p in target.iterdir()) == sorted([INFO_NAME, "other.json"])


@pytest.mark.parametrize(
    "files",
    [
        {"../x.json": MODEL_INFO},
        {".hidden.json": MODEL_INFO},
        {"x.txt": MODEL_INFO},
        {INFO_NAME: {"hash": "ab" * 32}},
        {INFO_NAME: {"hash": "not hex", "modelinfo": {}}},
        {INFO_NAME: {"hash": "ab" * 32, "modelinfo": {"f": {"nested": "object"}}}},
        {INFO_NAME: {"hash": "ab" * 32, "modelinfo": {"f": "x" * 1000}}},
        {f"f{i}.json": MODEL_INFO for i in range(65)},
    ],
)
def test_malformed_model_inspection_results_are_rejected(files):
    with pytest.raises(cache_wire.ProtocolError):
        cache_wire.parse_model_info({"type": "modelinfo", "files": files})
