import hashlib
import json
import os

import pytest

from loader.integration.fingerprint import compute_fingerprint

BASE = dict(dtype="float32", quantization=None, tp=1, pp=1, rank=0, vllm_version="0.32.0")


def make_checkpoint(root, weights: bytes, config=None):
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config or {"hidden_size": 256, "layers": 2}))
    (root / "model.safetensors").write_bytes(weights)
    return root


def fp(model_dir, tmp_path, model_id=None, **changes):
    args = {**BASE, **changes}
    return compute_fingerprint(model_dir, model_id, cache_dir=tmp_path / "cache", **args)


def test_same_checkpoint_same_fingerprint(tmp_path):
    a = make_checkpoint(tmp_path / "a", b"weights-one" * 100)
    b = make_checkpoint(tmp_path / "b", b"weights-one" * 100)
    assert fp(a, tmp_path) == fp(b, tmp_path)
    assert len(fp(a, tmp_path)) == 64


def test_same_architecture_different_weights_differ(tmp_path):
    a = make_checkpoint(tmp_path / "a", b"weights-one" * 100)
    b = make_checkpoint(tmp_path / "b", b"weights-two" * 100)
    assert fp(a, tmp_path) != fp(b, tmp_path)


@pytest.mark.parametrize(
    "change",
    [
        {"dtype": "bfloat16"},
        {"quantization": "fp8"},
        {"tp": 2},
        {"pp": 2},
        {"rank": 1},
        {"vllm_version": "0.33.0"},
    ],
)
def test_every_identity_field_matters(tmp_path, change):
    a = make_checkpoint(tmp_path / "a", b"w" * 10)
    assert fp(a, tmp_path) != fp(a, tmp_path, **change)


def test_config_json_matters_but_not_its_formatting(tmp_path):
    a = make_checkpoint(tmp_path / "a", b"w", config={"hidden_size": 256, "layers": 2})
    b = make_checkpoint(tmp_path / "b", b"w", config={"hidden_size": 512, "layers": 2})
    assert fp(a, tmp_path) != fp(b, tmp_path)
    (b / "config.json").write_text('{\n  "layers": 2,\n  "hidden_size": 256\n}\n')
    assert fp(a, tmp_path) == fp(b, tmp_path)


def test_model_id_lets_a_client_without_weight_files_match(tmp_path):
    server_dir = make_checkpoint(tmp_path / "server", b"w" * 50)
    client_dir = tmp_path / "client"
    client_dir.mkdir()
    (client_dir / "config.json").write_text((server_dir / "config.json").read_text())
    server = fp(server_dir, tmp_path, model_id="org/tiny@rev1")
    assert fp(client_dir, tmp_path, model_id="org/tiny@rev1") == server
    assert fp(client_dir, tmp_path, model_id="org/tiny@rev2") != server


def test_no_weights_and_no_model_id_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="MODEL"):
        fp(empty, tmp_path)
    with pytest.raises(ValueError, match="MODEL"):
        fp(None, tmp_path)


def test_hub_blob_name_is_used_as_content_id_without_reading(tmp_path):
    blob_sha = "a" * 64
    blobs = tmp_path / "hub" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / blob_sha).write_bytes(b"content that does not hash to the name")
    snap = tmp_path / "hub" / "snapshots" / "rev"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    os.symlink(blobs / blob_sha, snap / "model.safetensors")
    other = tmp_path / "copy"
    other.mkdir()
    (other / "config.json").write_text("{}")
    (other / "model.safetensors").write_bytes(b"content that does not hash to the name")
    # a plain copy is hashed (sha256 of content) and so differs from the blob's declared id
    assert fp(snap, tmp_path) != fp(other, tmp_path)
    blob_sha = hashlib.sha256(b"real").hexdigest()
    (blobs / blob_sha).write_bytes(b"real")
    (snap / "model.safetensors").unlink()
    os.symlink(blobs / blob_sha, snap / "model.safetensors")
    (other / "model.safetensors").write_bytes(b"real")
    assert fp(snap, tmp_path) == fp(other, tmp_path)


def test_digest_is_cached_by_path_size_and_mtime(tmp_path):
    a = make_checkpoint(tmp_path / "a", b"x" * 1000)
    first = fp(a, tmp_path)
    cache = json.loads((tmp_path / "cache" / "file-digests.json").read_text())
    assert len(cache) == 1
    # same size, same mtime, different bytes: the cached digest is reused (cheap path)
    weights = a / "model.safetensors"
    st = weights.stat()
    weights.write_bytes(b"y" * 1000)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert fp(a, tmp_path) == first
    # a new mtime invalidates the entry
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert fp(a, tmp_path) != first
