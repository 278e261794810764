import pytest
import zmq

from mesh.security import (
    ClusterKeys,
    derive_cluster_keys,
    load_cluster_keys,
    release_context,
    secure_client,
    secure_server,
)


def _write(tmp_path, name, content: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


def test_no_secret_means_open_mode():
    assert load_cluster_keys(None) is None
    assert load_cluster_keys("") is None


def test_keys_are_deterministic_and_depend_on_secret(tmp_path):
    a = load_cluster_keys(_write(tmp_path, "a", b"s3cret\n"))
    a_again = load_cluster_keys(_write(tmp_path, "a2", b"s3cret"))
    b = load_cluster_keys(_write(tmp_path, "b", b"other"))
    assert isinstance(a, ClusterKeys)
    assert a == a_again
    assert a.public != b.public and a.secret != b.secret
    assert len(a.public) == 40 and len(a.secret) == 40
    assert zmq.curve_public(a.secret) == a.public
    assert b"s3cret" not in repr(a).encode()


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
    keys = derive_cluster_keys(b"cluster")
    assert _roundtrip(keys, keys) == b"hello"


def test_wrong_secret_is_rejected():
    assert _roundtrip(derive_cluster_keys(b"cluster"), derive_cluster_keys(b"intruder"), 700) is None


def test_client_without_secret_is_rejected():
    assert _roundtrip(derive_cluster_keys(b"cluster"), None, 700) is None


def test_open_mode_talks():
    assert _roundtrip(None, None) == b"hello"


def test_zap_rejects_client_that_knows_only_the_public_key():
    cluster = derive_cluster_keys(b"cluster")
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
        client.close(0)
        server.close(0)
    finally:
        release_context(ctx)
        ctx.term()
