"""What a source keeps to serve, when it takes clients, and how it learns that vLLM's
warm-up is over (no vLLM process)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loader.integration import serving
from loader.transfer import admission
from loader.transfer.client import fetch_from_sources
from loader.transfer.device import session_device_bytes
from loader.transfer.protocol import is_retryable
from tests.transfer.helpers import (
    FAST,
    FINGERPRINT,
    empty_like_all,
    in_process_server,
    make_tensors,
)


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.kept = nn.Linear(8, 8, bias=False)
        self.replaced = nn.Linear(16, 16, bias=False)


def test_only_replaced_parameters_count_as_retained_and_live_ones_are_served_as_they_are():
    model = TwoLayers()
    raw = {name: p.data for name, p in model.named_parameters()}
    # what kernel post-processing does to one layer: a new parameter, the old one dropped
    model.replaced.weight = nn.Parameter(model.replaced.weight.data.t().contiguous())
    served, retained = serving.served_tensors(raw, model)
    assert retained == 16 * 16 * 4
    assert served["kept.weight"] is raw["kept.weight"]
    assert served["replaced.weight"] is raw["replaced.weight"]  # on CPU the copy stays put


def test_on_an_accelerator_retained_copies_move_to_host_memory():
    """(CPU tensors stand for device ones here: `to_host` is what a device tensor gets.)"""
    model = TwoLayers()
    raw = {name: p.data for name, p in model.named_parameters()}
    model.replaced.weight = nn.Parameter(model.replaced.weight.data.t().contiguous())
    served, retained = serving.served_tensors(raw, model, to_host=True)
    assert retained == 16 * 16 * 4
    copy = served["replaced.weight"]
    assert copy.untyped_storage().data_ptr() != raw["replaced.weight"].untyped_storage().data_ptr()
    assert torch.equal(copy, raw["replaced.weight"]) and copy.device.type == "cpu"
    assert served["kept.weight"] is raw["kept.weight"]  # live: served from where it is


def test_a_source_takes_no_new_client_while_vllm_warms_up():
    gate = serving.WarmUp()
    gate.begin()
    assert gate.refusal() is None  # not watched: never waits for a signal that won't come
    gate.watch()
    gate.begin()
    source = make_tensors(31, small=3, big_numel=1000)
    with in_process_server(source, admission=gate.refusal) as server:
        refused = fetch_from_sources([server.endpoint], FINGERPRINT, empty_like_all(source), 0, FAST)
        gate.done()
        served = fetch_from_sources([server.endpoint], FINGERPRINT, empty_like_all(source), 0, FAST)
    [(_, reason)] = refused.failures
    assert "warming up" in reason and is_retryable(reason)
    assert served.ok, served.failures


def test_a_source_without_device_memory_for_a_session_answers_busy(monkeypatch):
    source = make_tensors(32, small=3, big_numel=1000)
    # as on a nearly full accelerator
    monkeypatch.setattr(admission, "free_device_bytes", lambda device: 1 << 20)
    with in_process_server(source) as server:
        outcome = fetch_from_sources([server.endpoint], FINGERPRINT, empty_like_all(source), 0, FAST)
    [(_, reason)] = outcome.failures
    assert "device memory: 1 MiB free, a session needs 2 MiB" in reason and is_retryable(reason)


def test_the_plugin_sees_vllm_warm_up_end(monkeypatch):
    from vllm.v1.worker.worker_base import WorkerWrapperBase

    from loader.integration import plugin

    monkeypatch.delattr(WorkerWrapperBase, "_netloader_watches_warm_up", raising=False)
    monkeypatch.setattr(WorkerWrapperBase, "compile_or_warm_up_model", None, raising=False)
    monkeypatch.delattr(WorkerWrapperBase, "compile_or_warm_up_model")
    gate = serving.WarmUp()
    monkeypatch.setattr(serving, "warm_up", gate)
    plugin._watch_warm_up()
    gate.begin()
    assert gate.refusal() is not None

    class Worker:
        def compile_or_warm_up_model(self):
            assert gate.refusal() is not None  # still warming while vLLM works
            return "compiled"

    wrapper = WorkerWrapperBase.__new__(WorkerWrapperBase)
    wrapper.worker = Worker()
    assert wrapper.compile_or_warm_up_model() == "compiled"
    assert gate.refusal() is None


@pytest.mark.parametrize("backend,at_least", [("hccl", 400 << 20), ("nccl", 64 << 20), ("gloo", 0)])
def test_session_memory_counts_the_communicator(backend, at_least):
    assert session_device_bytes(backend, 64 << 20) >= (128 << 20) + at_least
