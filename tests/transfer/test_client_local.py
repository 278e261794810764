"""Client behaviour that needs no peer process."""

import torch

from loader.transfer.client import FetchOutcome, fetch_from_sources
from tests.transfer.helpers import FAST, FINGERPRINT


def test_no_sources_is_a_failure_without_reasons():
    outcome = fetch_from_sources([], FINGERPRINT, {"w": torch.zeros(3)}, 0, FAST)
    assert outcome == FetchOutcome(False, None, 0, 0.0, [])
    assert outcome.fallback_reason is None


def test_malformed_source_addresses_are_recorded_and_skipped():
    outcome = fetch_from_sources(["nohostport", "host:99999"], FINGERPRINT, {"w": torch.zeros(3)}, 0, FAST)
    assert not outcome.ok
    assert [src for src, _ in outcome.failures] == ["nohostport", "host:99999"]
    assert all(reason.startswith("source:") for _, reason in outcome.failures)
    assert outcome.fallback_reason.startswith("nohostport: source:")


def test_local_tensors_that_cannot_be_described_fail_cleanly():
    sparse = torch.eye(3).to_sparse()
    outcome = fetch_from_sources(["127.0.0.1:1"], FINGERPRINT, {"w": sparse}, 0, FAST)
    assert not outcome.ok and outcome.failures[0][0] == "local"
