"""Two-process transfers over 127.0.0.1 with gloo, including the fault cases.

The source runs in a spawned process; the client runs here. Each fault test puts a
misbehaving source first and a healthy one second: the fetch must end on the healthy
one, with the first source's failure recorded.
"""

import socket
import threading
import time

import pytest
import torch
import zmq

from loader.config import TransferSettings
from loader.transfer.client import fetch_from_sources
from tests.transfer.helpers import FAST, FINGERPRINT, SourceProcess, empty_like_all, make_tensors

pytestmark = [pytest.mark.loopback, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def healthy_source():
    with SourceProcess() as endpoint:
        yield endpoint


def fetch(sources, settings=FAST, fingerprint=FINGERPRINT, keys=None, **tensor_kwargs):
    reference = make_tensors(0, **tensor_kwargs)
    dest = empty_like_all(reference)
    outcome = fetch_from_sources(sources, fingerprint, dest, 0, settings, keys=keys)
    return outcome, dest, reference


def assert_identical(dest, reference):
    for name, ref in reference.items():
        assert dest[name].dtype == ref.dtype and torch.equal(dest[name], ref), name
    assert dest["lm_head.weight"].data_ptr() == dest["embed.weight"].data_ptr()  # still tied


def test_transfer_is_bit_identical(healthy_source):
    outcome, dest, reference = fetch([healthy_source])
    assert outcome.ok and outcome.peer == healthy_source and outcome.failures == []
    assert outcome.bytes == sum(
        t.numel() * t.element_size() for n, t in reference.items() if n != "lm_head.weight"
    )
    assert_identical(dest, reference)


def test_concurrent_clients_all_succeed(healthy_source):
    results = [None] * 3

    def one(i):
        results[i] = fetch([healthy_source])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for outcome, dest, reference in results:
        assert outcome.ok, outcome.failures
        assert_identical(dest, reference)


def test_refused_port_then_next_source(healthy_source):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead = f"127.0.0.1:{closed.getsockname()[1]}"
    closed.close()
    outcome, dest, reference = fetch([dead, healthy_source])
    assert outcome.ok and outcome.peer == healthy_source
    assert outcome.failures == [(dead, "connection refused")]
    assert_identical(dest, reference)


def test_source_that_accepts_and_never_answers(healthy_source):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # the kernel completes the TCP handshake; nobody ever reads
    addr = f"127.0.0.1:{silent.getsockname()[1]}"
    try:
        outcome, dest, reference = fetch([addr, healthy_source])
    finally:
        silent.close()
    assert outcome.ok and outcome.peer == healthy_source
    [(source, reason)] = outcome.failures
    assert source == addr and reason.startswith("handshake timed out")
    assert_identical(dest, reference)


def test_source_that_answers_garbage(healthy_source):
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")

    def reply_garbage():
        if router.poll(20_000):
            identity, _ = router.recv_multipart()
            router.send_multipart([identity, b"\x00\xffnot json at all"])

    replier = threading.Thread(target=reply_garbage)
    replier.start()
    try:
        outcome, dest, reference = fetch([f"127.0.0.1:{port}", healthy_source])
    finally:
        replier.join(30)
        router.close(0)
        ctx.term()
    assert outcome.ok and outcome.peer == healthy_source
    [(_, reason)] = outcome.failures
    assert reason.startswith("bad reply")
    assert_identical(dest, reference)


def test_wrong_fingerprint_is_refused():
    with SourceProcess(fingerprint="cd" * 32) as other:
        outcome, _, _ = fetch([other])
    assert not outcome.ok and outcome.peer is None
    [(source, reason)] = outcome.failures
    assert source == other and reason.startswith("refused: fingerprint mismatch")


def test_manifest_mismatch_names_the_tensor(healthy_source):
    reference = make_tensors(0)
    dest = empty_like_all(reference)
    dest["layer7.bias"] = torch.zeros(6, dtype=torch.bfloat16)
    outcome = fetch_from_sources([healthy_source], FINGERPRINT, dest, 0, FAST)
    [(_, reason)] = outcome.failures
    assert not outcome.ok
    assert reason.startswith("refused: manifest mismatch: tensor 'layer7.bias': shape differs"), reason


def test_checksum_mismatch_fails_the_source(healthy_source):
    with SourceProcess(fault="corrupt_after_checksums") as corrupt:
        outcome, dest, reference = fetch([corrupt, healthy_source])
    assert outcome.ok and outcome.peer == healthy_source
    [(source, reason)] = outcome.failures
    assert source == corrupt and reason.startswith("checksum mismatch in bucket 0"), reason
    assert_identical(dest, reference)


def test_source_killed_mid_transfer(healthy_source):
    many = {"small": 1500}
    with SourceProcess(fault="kill_mid_transfer", tensor_kwargs=many) as dying:
        with SourceProcess(tensor_kwargs=many) as healthy_big:
            outcome, dest, reference = fetch([dying, healthy_big], **many)
    assert outcome.ok and outcome.peer == healthy_big
    [(source, reason)] = outcome.failures
    assert source == dying and reason.startswith("transfer failed"), reason
    assert_identical(dest, reference)


def test_a_source_that_goes_silent_mid_transfer_is_left_long_before_the_bucket_timeout():
    """A frozen source (SIGSTOP: no FIN, no RST, no answer, as a crashed host) is presumed
    dead once it answers no ping; the next source resumes. Without pings the attempt
    would end only at the bucket timeout, with a "Timed out" reason."""
    many = {"small": 1500}
    patient = TransferSettings(
        **{**FAST.__dict__, "bucket_timeout_s": 150.0, "silence_timeout_s": 2.0}
    )
    with SourceProcess(fault="freeze_mid_transfer", tensor_kwargs=many) as frozen:
        with SourceProcess(tensor_kwargs=many) as healthy_big:
            outcome, dest, reference = fetch([frozen, healthy_big], settings=patient, **many)
    assert outcome.ok and outcome.peer == healthy_big
    [(source, reason)] = outcome.failures
    assert source == frozen and "presumed dead" in reason, reason
    assert_identical(dest, reference)


def test_source_that_hangs_after_the_handshake(healthy_source):
    short = TransferSettings(**{**FAST.__dict__, "bucket_timeout_s": 2.0})
    with SourceProcess(fault="hang_after_ack") as hanging:
        outcome, dest, reference = fetch([hanging, healthy_source], settings=short)
    assert outcome.ok and outcome.peer == healthy_source
    [(source, reason)] = outcome.failures
    assert source == hanging and ("timed out" in reason or "Timed out" in reason), reason
    assert_identical(dest, reference)


def test_busy_source_when_over_the_client_limit():
    one_slot = TransferSettings(
        **{**FAST.__dict__, "max_concurrent_clients": 1, "bucket_timeout_s": 4.0}
    )
    with SourceProcess(settings=one_slot, fault="hang_after_ack") as busy:
        first = threading.Thread(target=fetch, args=([busy],), kwargs={"settings": FAST})
        first.start()
        for _ in range(100):  # wait until the first client holds the only slot
            outcome, _, _ = fetch([busy])
            if outcome.failures and outcome.failures[0][1].startswith("busy"):
                break
            time.sleep(0.1)
        first.join(60)
    assert outcome.failures[0][1].startswith("busy: source busy")


def test_authenticated_source_serves_only_key_holders(tmp_path):
    from mesh.security import load_cluster_keys, write_secret_file

    secret, wrong = tmp_path / "secret", tmp_path / "wrong"
    write_secret_file(str(secret))
    write_secret_file(str(wrong))
    with SourceProcess(secret_file=str(secret)) as secured:
        no_key, _, _ = fetch([secured])
        wrong_key, _, _ = fetch([secured], keys=load_cluster_keys(str(wrong)))
        outcome, dest, reference = fetch([secured], keys=load_cluster_keys(str(secret)))
    assert not no_key.ok and no_key.failures[0][1].startswith("handshake timed out")
    assert not wrong_key.ok and wrong_key.failures[0][1].startswith("handshake timed out")
    assert outcome.ok and outcome.peer == secured
    assert_identical(dest, reference)
