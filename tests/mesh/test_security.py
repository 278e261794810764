import base64
import hashlib
import logging
import os
import stat
import threading
import time

import pytest
import zmq

from mesh import security
from mesh.security import (
    ClusterKeys,
    RejectionLog,
    derive_cluster_keys,
    load_cluster_keys,
    release_context,
    secure_client,
    secure_server,
    write_secret_file,
)

CLUSTER = b"cluster secret for the tests"
INTRUDER = b"intruder secret for the tests"


def _write(tmp_path, name, content: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


def test_no_secret_file_means_no_keys():
    assert load_cluster_keys(None) is None
    assert load_cluster_keys("") is None


def test_keys_are_deterministic_and_depend_on_secret(tmp_path):
    a = load_cluster_keys(_write(tmp_path, "a", b"s3cret-s3cret-s3cret\n"))
    a_again = load_cluster_keys(_write(tmp_path, "a2", b"s3cret-s3cret-s3cret"))
    b = load_cluster_keys(_write(tmp_path, "b", b"other-other-other-other"))
    assert isinstance(a, ClusterKeys)
    assert a == a_again
    assert a.public != b.public and a.secret != b.secret
    assert len(a.public) == 40 and len(a.secret) == 40
    assert zmq.curve_public(a.secret) == a.public
    assert b"s3cret" not in repr(a).encode()


def test_short_secret_is_rejected_naming_the_file_and_keygen(tmp_path):
    short = _write(tmp_path, "short", b"  " + b"x" * 15 + b"\n")  # 15 bytes once stripped
    with pytest.raises(ValueError, match="short.*16.*mesh keygen"):
        load_cluster_keys(short)
    assert load_cluster_keys(_write(tmp_path, "ok", b"  " + b"x" * 16 + b"\n")) is not None
    with pytest.raises(ValueError, match="too short"):
        derive_cluster_keys(b"x" * 15)


def test_keys_come_from_scrypt_with_pinned_parameters(monkeypatch):
    """A known answer: changing the KDF or its salt would split a cluster by version.
    The parameters are memory-hard (scrypt, >= 16 MiB) and the derivation is cached."""
    secret = b"netloader test vector secret"
    security._derive.cache_clear()
    calls = []
    scrypt = hashlib.scrypt

    def counting_scrypt(password, **kwargs):
        calls.append(kwargs)
        return scrypt(password, **kwargs)

    monkeypatch.setattr(hashlib, "scrypt", counting_scrypt)
    started = time.monotonic()
    keys = derive_cluster_keys(secret)
    first = time.monotonic() - started
    assert keys.public == b"gz&hwL@FE4>uBDs89>xRVA:v7[CStAL.-cc.ykBI"
    [params] = calls
    assert 128 * params["r"] * params["n"] >= 16 << 20 and params["p"] == 1
    assert derive_cluster_keys(secret) == keys and len(calls) == 1  # once per process
    print(f"\nscrypt key derivation: {first:.3f}s")
    assert first < 2.0


def test_keygen_writes_a_private_random_secret_and_never_overwrites(tmp_path):
    a, b = tmp_path / "a.secret", tmp_path / "b.secret"
    write_secret_file(str(a))
    write_secret_file(str(b))
    assert stat.S_IMODE(os.stat(a).st_mode) == 0o600
    assert len(base64.b64decode(a.read_bytes().strip(), validate=True)) == 32
    assert a.read_bytes() != b.read_bytes()
    assert load_cluster_keys(str(a)) != load_cluster_keys(str(b))
    before = a.read_bytes()
    with pytest.raises(FileExistsError):
        write_secret_file(str(a))
    assert a.read_bytes() == before
    os.chmod(a, 0o644)
    write_secret_file(str(a), force=True)
    assert a.read_bytes() != before and stat.S_IMODE(os.stat(a).st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.secret", "b.secret"]


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_rejected_client_keys_are_logged_once_per_key_then_one_summary_a_minute(caplog):
    clock = Clock()
    rejections = RejectionLog(clock=clock, interval_s=60)
    caplog.set_level(logging.WARNING, logger="mesh.security")

    def at(t, key, times=1):
        clock.now = t
        for _ in range(times):
            rejections.rejected(key)
        lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        caplog.clear()
        return lines

    [first] = at(0, b"A" * 40)
    assert "A" * 40 in first and "not the cluster key" in first
    assert at(1, b"A" * 40, times=5) == []
    [other] = at(2, b"B" * 40)
    assert "B" * 40 in other
    assert at(59, b"A" * 40) == []
    [summary] = at(61, b"B" * 40)
    assert "7 more" in summary and "2 distinct" in summary  # 5 + 1 + 1, the first ones logged
    assert at(62, b"A" * 40, times=100) == []
    [summary] = at(121, b"A" * 40)
    assert "101 more" in summary


def test_rejection_log_bounds_the_keys_it_logs_one_by_one(caplog):
    clock = Clock()
    rejections = RejectionLog(clock=clock, interval_s=60, max_keys=3)
    caplog.set_level(logging.WARNING, logger="mesh.security")
    for i in range(50):  # a scan with fresh keys does not flood the log
        rejections.rejected(b"%040d" % i)
    assert len(caplog.records) == 3


def test_missing_or_empty_secret_file_names_the_path(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(ValueError, match="nope"):
        load_cluster_keys(missing)
    empty = _write(tmp_path, "empty", b"  \n")
    with pytest.raises(ValueError, match="empty"):
        load_cluster_keys(empty)


def _roundtrip(server_keys, client_keys, timeout_ms=1500):
    ctx = zmq.Context()
    try:
        server = ctx.socket(zmq.ROUTER)
        secure_server(server, server_keys)
        port = server.bind_to_random_port("tcp://127.0.0.1")
        client = ctx.socket(zmq.DEALER)
        client.linger = 0
        secure_client(client, client_keys)
        client.connect(f"tcp://127.0.0.1:{port}")
        client.send(b"hello")
        got = server.poll(timeout_ms)
        result = server.recv_multipart()[-1] if got else None
        client.close(0)
        server.close(0)
        return result
    finally:
        release_context(ctx)
        ctx.term()


def test_same_secret_talks():
    keys = derive_cluster_keys(CLUSTER)
    assert _roundtrip(keys, keys) == b"hello"


def test_wrong_secret_is_rejected():
    assert _roundtrip(derive_cluster_keys(CLUSTER), derive_cluster_keys(INTRUDER), 700) is None


def test_client_without_secret_is_rejected():
    assert _roundtrip(derive_cluster_keys(CLUSTER), None, 700) is None


def test_open_mode_talks():
    assert _roundtrip(None, None) == b"hello"


def test_zap_rejects_client_that_knows_only_the_public_key(caplog):
    caplog.set_level(logging.WARNING, logger="mesh.security")
    cluster = derive_cluster_keys(CLUSTER)
    own_public, own_secret = zmq.curve_keypair()
    ctx = zmq.Context()
    try:
        server = ctx.socket(zmq.ROUTER)
        secure_server(server, cluster)
        port = server.bind_to_random_port("tcp://127.0.0.1")
        client = ctx.socket(zmq.DEALER)
        client.linger = 0
        client.curve_secretkey = own_secret
        client.curve_publickey = own_public
        client.curve_serverkey = cluster.public
        client.connect(f"tcp://127.0.0.1:{port}")
        client.send(b"let me in")
        assert server.poll(700) == 0
        deadline = time.monotonic() + 10
        while not logged(caplog, own_public.decode()) and time.monotonic() < deadline:
            time.sleep(0.05)
        client.close(0)
        server.close(0)
    finally:
        release_context(ctx)
        ctx.term()
    assert logged(caplog, own_public.decode())  # rejected by the ZAP handler, at WARNING


def logged(caplog, text: str) -> bool:
    return any(text in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_closing_a_context_does_not_wait_for_a_socket_an_error_path_left_open():
    context = zmq.Context()
    forgotten = context.socket(zmq.DEALER)
    forgotten.setsockopt(zmq.LINGER, -1)  # with a queued message, term() would wait for ever
    forgotten.connect("tcp://127.0.0.1:9")
    forgotten.send(b"never delivered")
    closer = threading.Thread(target=security.close_context, args=(context,), daemon=True)
    closer.start()
    closer.join(30)
    assert not closer.is_alive(), "close_context blocked on an open socket"
    assert context.closed and forgotten.closed
