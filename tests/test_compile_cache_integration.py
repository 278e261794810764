"""The vLLM side of compile caches: the compile key, which entry vLLM used, the local
index, the offer a source keeps current, the config keys, and how peers are chosen."""

from __future__ import annotations

import os
import threading
import time
from types import SimpleNamespace

import pytest

from loader.config import parse_extra_config
from loader.distribution.peer_record import PeerRecord
from loader.distribution.ranking import cache_table, rank_upstreams
from loader.integration import compile_cache
from mesh.member import Member
from mesh.security import load_cluster_keys, write_secret_file
from tests.transfer.helpers import FAST

AOT = "torch_compile_cache/torch_aot_compile/feed01"


def _vllm_config(root, rank=0, mode=3, enforce_eager=False, config_hash="h1", used=()):
    compilation = SimpleNamespace(mode=mode, cache_dir="", local_cache_dir=None)
    for attr, path in used:
        setattr(compilation, attr, os.path.join(root, path))
    return SimpleNamespace(
        compilation_config=compilation,
        model_config=SimpleNamespace(enforce_eager=enforce_eager),
        parallel_config=SimpleNamespace(rank=rank, data_parallel_index=0),
        device_config=SimpleNamespace(device="cpu"),
        compute_hash=lambda: config_hash,
    )


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path / "root"))
    return str(tmp_path / "root")


def test_the_key_follows_what_compiled_code_depends_on(root):
    one = compile_cache.compile_identity(_vllm_config(root))
    assert one.root == root and one.rank_dir == "rank_0_0"
    assert one.factors["config_hash"] == "h1" and one.factors["device"].startswith("cpu ")
    assert one == compile_cache.compile_identity(_vllm_config(root))  # stable
    assert one.key != compile_cache.compile_identity(_vllm_config(root, config_hash="h2")).key
    assert one.key != compile_cache.compile_identity(_vllm_config(root, rank=1)).key


def test_no_key_without_compilation(root, monkeypatch):
    assert "compilation is off" in compile_cache.compile_identity(_vllm_config(root, enforce_eager=True))
    assert "compilation is off" in compile_cache.compile_identity(_vllm_config(root, mode=0))
    monkeypatch.setenv("VLLM_DISABLE_COMPILE_CACHE", "1")
    assert "VLLM_DISABLE_COMPILE_CACHE" in compile_cache.compile_identity(_vllm_config(root))


def _make(root, *paths):
    for path in paths:
        full = os.path.join(root, path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "wb") as fh:
            fh.write(b"x" * 10)


@pytest.mark.parametrize(
    "used, entry",
    [
        # vLLM's AOT mode: the hash-level directory, shared by the ranks of a host
        ((("local_cache_dir", AOT),), AOT),
        # without AOT: cache_dir is the entry, local_cache_dir the rank's part of it
        ((("cache_dir", "torch_compile_cache/ab12"),
          ("local_cache_dir", "torch_compile_cache/ab12/rank_0_0/backbone")),
         "torch_compile_cache/ab12"),
    ],
)
def test_a_source_offers_the_entry_vllm_used_without_other_ranks_parts(root, used, entry, monkeypatch):
    monkeypatch.setattr(compile_cache, "REFRESH_S", 0.1)
    _make(root, f"{entry}/rank_0_0/model", f"{entry}/rank_1_0/model",
          f"{entry}/inductor_cache/k.so", "torch_compile_cache/unrelated/x/y")
    config = _vllm_config(root, used=used)
    identity = compile_cache.compile_identity(config)
    keys = _keys(root)
    server = SimpleNamespace(compile_cache=None)
    stop = threading.Event()
    thread = compile_cache.offer_when_compiled(config, identity, FAST, keys, lambda: server, stop)
    _wait(lambda: server.compile_cache is not None)
    offer = server.compile_cache.offer
    assert offer.entries == (entry,) and offer.key == identity.key
    assert sorted(f.path for f in offer.files) == [
        f"{entry}/inductor_cache/k.so", f"{entry}/rank_0_0/model"
    ]
    # vLLM compiles more on the first requests: the offer follows
    _make(root, f"{entry}/inductor_cache/sampler.so")
    _wait(lambda: len(server.compile_cache.offer.files) == 3)
    stop.set()
    thread.join(5)
    # and the next start on this root knows the entry is here
    assert compile_cache.obtain(identity, [], FAST, keys) == compile_cache.LOCAL


def test_without_entry_or_sources_the_reason_is_given(root):
    identity = compile_cache.compile_identity(_vllm_config(root))
    assert compile_cache.obtain(identity, [], FAST, None) == "none: no peer offers this compile key"
    reason = compile_cache.obtain(identity, ["127.0.0.1:1"], FAST, _keys(root))
    assert reason == "none: 127.0.0.1:1: connection refused"


def test_config_keys_turn_it_off_and_bound_it_naming_the_bad_key():
    assert parse_extra_config({}).settings.compile_cache is True
    assert parse_extra_config({"compile_cache": False}).settings.compile_cache is False
    with pytest.raises(ValueError, match="^compile_cache: expected true or false"):
        parse_extra_config({"compile_cache": "no"})
    with pytest.raises(ValueError, match="^compile_cache_max_mb: "):
        parse_extra_config({"compile_cache_max_mb": 0})
    with pytest.raises(ValueError, match="^compile_cache_timeout_s: "):
        parse_extra_config({"compile_cache_timeout_s": -1})


def _member(name, key, zone=None, rtt_s=0.001, is_self=False, endpoint=None):
    record = PeerRecord(fingerprint="f" * 8, tp=1, pp=1, rank=0, ready=True,
                        endpoint=endpoint or f"{name}:1", compile_key=key, zone=zone)
    return Member(name=name, addr=f"{name}:7946", state="alive", incarnation=1,
                  meta=record.to_meta(), rtt_s=rtt_s, is_self=is_self)


def test_cache_sources_are_the_members_offering_the_key_nearest_first():
    members = [
        _member("far", "k1", zone="z2"),
        _member("near", "k1", zone="z1"),
        _member("other-key", "k2", zone="z1"),
        _member("me", "k1", zone="z1", is_self=True),
        _member("none", None, zone="z1"),
    ]
    assert rank_upstreams(cache_table(members, "k1"), zone="z1") == ["near:1", "far:1"]
    record = PeerRecord.from_meta(_member("x", "k1").meta)
    assert record.compile_key == "k1"
    assert PeerRecord.from_meta({**_member("x", "k1").meta, "compile_key": 7}) is None


def _keys(root):
    path = os.path.join(os.path.dirname(root), "secret")
    if not os.path.exists(path):
        write_secret_file(path)
    return load_cluster_keys(path)


def _wait(condition, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


INFO = {"hash": "cd" * 32, "modelinfo": {"supports_pp": True}}


def _info_server(secret_path):
    import torch

    from loader.transfer.cache_source import ServedCache
    from loader.transfer.cache_wire import CacheOffer
    from tests.transfer.helpers import in_process_server

    served = ServedCache("/nonexistent", CacheOffer("5e" * 16, {}), {"m-Llama.json": INFO})
    return in_process_server({"w": torch.zeros(2)}, keys=load_cluster_keys(secret_path),
                             compile_cache=served)


def test_the_api_server_takes_model_inspection_results_from_a_static_source(root, tmp_path):
    from loader.integration import model_info

    secret = str(tmp_path / "secret")
    write_secret_file(secret)
    with _info_server(secret) as server:
        config = {"SOURCE": [{"device_id": 0, "sources": [server.endpoint]}], "secret_file": secret}
        model_info.prefetch(config)
    assert model_info.read_model_infos(os.path.join(root, "modelinfos")) == {"m-Llama.json": INFO}


def test_without_a_secret_or_turned_off_no_peer_is_asked(root, tmp_path, monkeypatch):
    from loader.integration import model_info

    asked = []
    monkeypatch.setattr("loader.transfer.cache_client.fetch_model_infos",
                        lambda *a, **k: asked.append(a))
    model_info.prefetch({"SOURCE": [{"device_id": 0, "sources": ["127.0.0.1:9"]}]})
    secret = str(tmp_path / "secret")
    write_secret_file(secret)
    model_info.prefetch({"SOURCE": [{"device_id": 0, "sources": ["127.0.0.1:9"]}],
                         "secret_file": secret, "compile_cache": False})
    model_info.prefetch({"LISTEN_PORT": "bad"})  # the engine reports bad configs itself
    assert asked == [] and model_info.read_model_infos() == {}


def test_the_plugin_fetches_inspection_results_before_the_model_config_for_netloader_only(
    monkeypatch,
):
    from loader.integration import model_info, plugin, vllm_compat

    class EngineArgs:
        def __init__(self, load_format):
            self.load_format, self.model_loader_extra_config = load_format, {"MODEL": "m"}

        def create_model_config(self):
            return ("model config", seen[:])

    seen = []
    monkeypatch.setitem(vllm_compat.SURFACE.found, "EngineArgs", EngineArgs)
    monkeypatch.setattr(model_info, "prefetch", lambda extra: seen.append(extra))
    plugin._prefetch_model_infos()
    plugin._prefetch_model_infos()  # idempotent: wrapped once
    assert EngineArgs("netloader").create_model_config() == ("model config", [{"MODEL": "m"}])
    assert EngineArgs("auto").create_model_config() == ("model config", [{"MODEL": "m"}])
    assert seen == [{"MODEL": "m"}]
