"""Server and client in one process (two threads): quick end-to-end checks of variants."""

import pytest
import torch

from loader.transfer.checksum import BLAKE3_KEYED, MLH31
from loader.transfer.client import fetch_from_sources
from tests.transfer.helpers import (
    FAST,
    FINGERPRINT,
    empty_like_all,
    in_process_server,
    make_tensors,
)

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("algorithm", [BLAKE3_KEYED, MLH31])
def test_every_checksum_algorithm_round_trips(algorithm, monkeypatch):
    from loader.transfer import server as server_module

    source = make_tensors(1, small=5, big_numel=100_000)
    # as a source on another device type would choose
    monkeypatch.setattr(server_module, "algorithm_for_device", lambda device_type: algorithm)
    with in_process_server(source) as server:
        dest = empty_like_all(source)
        outcome = fetch_from_sources([server.endpoint], FINGERPRINT, dest, 0, FAST)
    assert outcome.ok, outcome.failures
    for name, t in source.items():
        assert torch.equal(dest[name], t), name


def test_a_non_contiguous_destination_is_refused_before_any_transfer():
    """Received bytes are copied into destinations by byte range; a transposed
    destination cannot take them, so the fetch says why and the caller loads from disk."""
    source = make_tensors(2, small=5, big_numel=100_000)
    with in_process_server(source) as server:
        dest = empty_like_all(source)
        dest["layer0.weight"] = torch.zeros(3, 97).t()
        outcome = fetch_from_sources([server.endpoint], FINGERPRINT, dest, 0, FAST)
    assert not outcome.ok
    assert outcome.failures == [("local", "cannot prepare the transfer: ValueError: destination tensor layer0.weight is not contiguous")]


def test_server_control_loop_goes_idle_after_a_transfer():
    """Replies sent from session threads wake the control loop; it must consume the
    wakeup (a pending one makes every poll return at once: a core burnt while serving)."""
    import select
    import time

    source = make_tensors(4, small=3, big_numel=1000)
    with in_process_server(source) as server:
        outcome = fetch_from_sources([server.endpoint], FINGERPRINT, empty_like_all(source), 0, FAST)
        assert outcome.ok, outcome.failures
        deadline = time.monotonic() + 10
        while select.select([server._channel._wake_r], [], [], 0)[0] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not select.select([server._channel._wake_r], [], [], 0)[0], "wakeup never consumed"


def test_a_refusal_is_answered_at_once_not_on_the_next_poll_timeout(monkeypatch):
    from loader.transfer import control_channel

    # a reply queued by the control thread itself used to wait for the poll timeout: with
    # a timeout far beyond the client's handshake timeout, the client would see a timeout
    # instead of the reason
    monkeypatch.setattr(control_channel, "_POLL_MS", 3_600_000)
    source = make_tensors(5, small=3, big_numel=1000)
    with in_process_server(source, fingerprint="cd" * 32) as server:  # other fingerprint
        outcome = fetch_from_sources([server.endpoint], FINGERPRINT, empty_like_all(source), 0, FAST)
    assert not outcome.ok and "fingerprint mismatch" in outcome.failures[0][1], outcome.failures
