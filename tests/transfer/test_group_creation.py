"""Transfer groups: rendezvous under the session's prefix, abort-only accelerator
communicators, and vLLM's own settings left alone."""

from __future__ import annotations

import os
import threading

import pytest

import loader.transfer.process_group as pg_module
from loader.transfer.process_group import (
    ABORT_ONLY_ENV,
    CLIENT_RANK,
    SOURCE_RANK,
    bind_store_socket,
    create_transfer_group,
)

pytestmark = pytest.mark.timeout(60)


def build_pair(device_type: str, session: str = "ab" * 16):
    """Both ranks in this process, as a source and a client would build them."""
    sock = bind_store_socket("127.0.0.1")
    port = sock.getsockname()[1]
    out: dict = {}

    def source():
        out["source"] = create_transfer_group(
            device_type, "127.0.0.1", port, SOURCE_RANK, session, 10, 10, listen_socket=sock
        )

    thread = threading.Thread(target=source)
    thread.start()
    out["client"] = create_transfer_group(device_type, "127.0.0.1", port, CLIENT_RANK, session, 10, 10)
    thread.join(20)
    return out


@pytest.mark.parametrize("device_type,backend", [("cuda", "nccl"), ("npu", "hccl")])
def test_accelerator_groups_are_constructed_abort_only_and_the_env_is_restored(
    monkeypatch, device_type, backend
):
    """A stalled client must not take a serving source down: NCCL's default (3) and
    HCCL's (1) tear the process down on a timeout. The mode is read when the backend is
    constructed, so it must be set then, and only then."""
    seen: dict = {}

    def fake_backend(*args):
        seen.update({k: os.environ.get(k) for k in ABORT_ONLY_ENV[backend]})
        return object()

    monkeypatch.setattr(pg_module, "_nccl_group", fake_backend)
    import sys
    import types

    monkeypatch.setitem(
        sys.modules, "loader.transfer.process_group_npu", types.SimpleNamespace(hccl_group=fake_backend)
    )
    for key in ABORT_ONLY_ENV[backend]:
        monkeypatch.setenv(key, "3")  # what vLLM's process would have
    build_pair(device_type)
    assert seen == ABORT_ONLY_ENV[backend]
    assert all(os.environ[k] == "3" for k in ABORT_ONLY_ENV[backend])  # vLLM's groups untouched


def test_nccl_error_handling_mode_is_the_abort_only_one():
    # torch's ErrorHandlingMode: 0 none, 1 tear down, 2 clean up only (abort the
    # communicator, keep the process), 3 skip clean up (tear down, the default)
    assert ABORT_ONLY_ENV["nccl"]["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "2"
    assert ABORT_ONLY_ENV["nccl"]["TORCH_NCCL_ENABLE_MONITORING"] == "0"


def test_gloo_pair_moves_data_under_the_session_prefix():
    import torch

    pair = build_pair("cpu")
    data = torch.arange(100, dtype=torch.float32)
    got = torch.zeros(100)
    send = pair["source"].send([data], CLIENT_RANK, 7)
    pair["client"].recv([got], SOURCE_RANK, 7).wait()
    send.wait()
    assert torch.equal(got, data)


def test_gloo_streams_use_the_interfaces_gloo_socket_ifname_names(monkeypatch):
    """Inside a network namespace the hostname resolves to 127.0.0.1: operators (and the
    fleet simulation) name the interface in GLOO_SOCKET_IFNAME, as for torch's own groups."""
    from torch.distributed.distributed_c10d import ProcessGroupGloo

    made: list[str] = []
    monkeypatch.setattr(
        ProcessGroupGloo, "create_device", lambda interface="": made.append(interface) or interface
    )
    monkeypatch.setattr(ProcessGroupGloo, "create_default_device", lambda: made.append("") or "")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth0,eth1")
    assert pg_module._gloo_devices(3) == ["eth0", "eth1", "eth0"]
    monkeypatch.delenv("GLOO_SOCKET_IFNAME")
    assert pg_module._gloo_devices(2) == ["", ""]


def test_a_two_stream_group_on_a_named_interface_moves_bytes(monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    sock = bind_store_socket("127.0.0.1")
    port = sock.getsockname()[1]
    out: dict = {}

    def source():
        out["source"] = create_transfer_group(
            "cpu", "127.0.0.1", port, SOURCE_RANK, "cd" * 16, 10, 10, listen_socket=sock, streams=2
        )

    thread = threading.Thread(target=source)
    thread.start()
    client = create_transfer_group("cpu", "127.0.0.1", port, CLIENT_RANK, "cd" * 16, 10, 10, streams=2)
    thread.join(20)
    import torch

    sent = [torch.full((1000,), i + 1, dtype=torch.uint8) for i in range(2)]
    got = [torch.zeros(1000, dtype=torch.uint8) for _ in range(2)]
    receives = [client.recv([g], SOURCE_RANK, tag) for tag, g in enumerate(got)]  # both contexts
    for tag, t in enumerate(sent):
        out["source"].send([t], CLIENT_RANK, tag).wait()
    for r in receives:
        r.wait()
    assert all(torch.equal(a, b) for a, b in zip(sent, got, strict=True))
    pg_module.destroy_group(client)
    pg_module.destroy_group(out["source"])
