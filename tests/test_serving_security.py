"""Who serves weights, and what is said when weights move without authentication
(the loader's own code paths, no vLLM process)."""

import logging
import time

import pytest
import torch
from torch import nn
from vllm.config.load import LoadConfig

from loader.config import MeshConfig, parse_extra_config
from loader.distribution.discovery import MeshPresence
from loader.integration import serving
from loader.integration.identity import RankIdentity
from loader.integration.model_loader import NetloaderModelLoader
from loader.transfer.buckets import plan_buckets
from loader.transfer.client import FetchOutcome
from loader.transfer.manifest import build_manifest
from loader.transfer.protocol import Ack
from mesh.security import write_secret_file
from tests.support.vllm_process import free_port

IDENTITY = RankIdentity(rank=0, tp=1, pp=1, device="cpu", fingerprint="f" * 64)
DEAD_SOURCE = "127.0.0.1:9"


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    monkeypatch.delenv("NETLOADER_MESH_SECRET_FILE", raising=False)
    monkeypatch.delenv("NETLOADER_MESH_SEEDS", raising=False)
    yield
    serving.stop_all()


class DiskLoader:
    def __init__(self):
        self.loads = 0

    def load_weights(self, model, model_config):
        self.loads += 1


def loader_for(extra: dict) -> NetloaderModelLoader:
    loader = NetloaderModelLoader(
        LoadConfig(load_format="netloader", model_loader_extra_config=extra)
    )
    loader._disk = DiskLoader()
    return loader


def fill(loader):
    """What load_model does between building the model and post-processing it."""
    return loader._fill_weights(nn.Linear(4, 4), None, IDENTITY, None, time.monotonic())


def failing_fetch(tried: list):
    def fetch(sources, *args, keys=None, **kwargs):
        tried.append((list(sources), keys))
        return FetchOutcome(False, None, 0, 0.0, [(sources[0], "refused")])

    return fetch


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_plain_config_opens_no_weight_server():
    config = parse_extra_config({}, environ={})
    weights = {"w": torch.arange(8, dtype=torch.float32)}
    assert serving.start_relay(weights, IDENTITY, config) is None
    assert serving.start_serving(weights, IDENTITY, config) is None
    assert serving._servers == {}


def test_plain_netloader_loads_from_disk_and_says_once_that_serving_is_off(caplog):
    loader = loader_for({})
    caplog.set_level(logging.INFO, logger="loader")
    result, server = fill(loader)
    assert server is None and serving._servers == {}
    assert result.source == "disk" and loader._disk.loads == 1
    [off] = [r for r in caplog.records if "serving weights" in r.getMessage()]
    assert off.levelno == logging.INFO
    assert "is off" in off.getMessage() and "LISTEN_PORT" in off.getMessage()


def test_static_source_without_a_secret_serves_and_warns_who_can_read(caplog):
    port = free_port()
    config = parse_extra_config({"LISTEN_PORT": port, "listen_host": "127.0.0.1"}, environ={})
    caplog.set_level(logging.WARNING, logger="loader")
    server = serving.start_serving({"w": torch.ones(4)}, IDENTITY, config)
    assert server is not None and server.endpoint.endswith(f":{port}")
    [warning] = warnings(caplog)
    assert f"serving weights without authentication on 127.0.0.1:{port}" in warning
    assert "anyone who can reach it can read the weights" in warning and "secret_file" in warning


def test_static_client_without_a_secret_fetches_and_warns_of_impersonation(monkeypatch, caplog):
    loader = loader_for(
        {"SOURCE": [{"device_id": 0, "sources": [DEAD_SOURCE]}], "listen_host": "127.0.0.1"}
    )
    tried: list = []
    monkeypatch.setattr("loader.transfer.client.fetch_from_sources", failing_fetch(tried))
    caplog.set_level(logging.WARNING, logger="loader")
    result, server = fill(loader)
    assert tried == [([DEAD_SOURCE], None)] and result.source == "disk"
    assert server is not None  # a rank given SOURCE serves (relays) too
    [client] = [m for m in warnings(caplog) if "fetching" in m]
    assert client.startswith("rank 0: fetching weights without authentication")
    assert "impersonate the source and serve wrong weights" in client and "secret_file" in client
    assert any("serving weights without authentication" in m for m in warnings(caplog))


def test_with_a_secret_transfers_are_keyed_and_nothing_warns(tmp_path, monkeypatch, caplog):
    secret = tmp_path / "cluster.secret"
    write_secret_file(str(secret))
    loader = loader_for({"SOURCE": [{"device_id": 0, "sources": [DEAD_SOURCE]}],
                         "listen_host": "127.0.0.1", "secret_file": str(secret)})
    tried: list = []
    monkeypatch.setattr("loader.transfer.client.fetch_from_sources", failing_fetch(tried))
    caplog.set_level(logging.WARNING, logger="loader")
    result, server = fill(loader)
    [(_, keys)] = tried
    assert keys is not None and server is not None
    assert not [m for m in warnings(caplog) if "without authentication" in m]


def test_engine_start_refuses_a_mesh_without_a_secret():
    with pytest.raises(ValueError, match="^mesh.secret_file"):
        loader_for({"mesh": {"seeds": ["127.0.0.1:7946"]}})


def test_mesh_presence_passes_insecure_to_its_agent():
    closed = MeshPresence(MeshConfig(bind="127.0.0.1:0"), IDENTITY, None, "m")
    closed.start()
    assert closed.start_error is not None and "insecure" in closed.start_error
    opened = MeshPresence(MeshConfig(bind="127.0.0.1:0", insecure=True), IDENTITY, None, "m")
    opened.start()
    try:
        assert opened.start_error is None and opened.members()
    finally:
        opened.stop()


def test_downstream_waiting_on_a_failed_fetch_is_cut_off_before_the_disk_load(monkeypatch):
    # the fetch's source failed after one verified bucket, a downstream session waits on
    # the relay for the next upstream: loading from disk must end that session first,
    # or it would forward buckets the disk load is overwriting (never verified ones)
    loader = loader_for(
        {"SOURCE": [{"device_id": 0, "sources": [DEAD_SOURCE]}], "listen_host": "127.0.0.1"}
    )
    waiting = {}

    def fetch_then_fail(sources, fingerprint, tensors, rank, settings, keys=None, observer=None, **kw):
        plan = plan_buckets(build_manifest(tensors).specs, settings.bucket_bytes)
        checksums = ("00",) * len(plan)
        ack = Ack("ab" * 16, 1, settings.bucket_bytes, "nh32t2", checksums, "ef")
        observer.transfer_started(sources[0], ack, plan)
        observer.bucket_verified(sources[0], 0)
        waiting["session"] = observer.open_session(settings.bucket_bytes, None)
        observer.attempt_failed(sources[0], "connection reset")
        waiting["relay"], waiting["plan"] = observer, plan
        return FetchOutcome(False, None, 0, 0.0, [(sources[0], "connection reset")])

    class DiskAfterDownstreamEnded(DiskLoader):
        def load_weights(self, model, model_config):
            relay, session, plan = waiting["relay"], waiting["session"], waiting["plan"]
            assert relay.state == "attaching"
            with pytest.raises(RuntimeError, match="invalidated"):
                relay.before_bucket(session, plan[0])  # even the bucket it had verified
            super().load_weights(model, model_config)

    loader._disk = DiskAfterDownstreamEnded()
    monkeypatch.setattr("loader.transfer.client.fetch_from_sources", fetch_then_fail)
    result, server = fill(loader)
    assert result.source == "disk" and loader._disk.loads == 1 and server is not None
