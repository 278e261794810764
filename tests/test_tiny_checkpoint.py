import hashlib

import pytest

from tests.support.tiny_checkpoint import CheckpointSpec, build_checkpoint


def _digest(path):
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_same_seed_gives_identical_weights_other_seed_differs(tmp_path):
    spec = CheckpointSpec(hidden=128, layers=1, intermediate=128, kv_heads=1, vocab=300)
    a = build_checkpoint(tmp_path / "a", spec)
    b = build_checkpoint(tmp_path / "b", spec)
    c = build_checkpoint(tmp_path / "c", CheckpointSpec(**{**spec.__dict__, "seed": 1}))
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)
    assert (a / "tokenizer.json").exists() and (a / "config.json").exists()


def test_rebuild_is_skipped_when_spec_matches(tmp_path):
    spec = CheckpointSpec(hidden=128, layers=1, intermediate=128, kv_heads=1, vocab=300)
    path = build_checkpoint(tmp_path / "a", spec)
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    build_checkpoint(tmp_path / "a", spec)
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime


@pytest.mark.parametrize("bad", [{"hidden": 100}, {"kv_heads": 3}, {"layers": 0}, {"dtype": "int8"}])
def test_bad_spec_is_rejected_naming_the_field(bad, tmp_path):
    field = next(iter(bad))
    with pytest.raises(ValueError, match=field):
        build_checkpoint(tmp_path / "x", CheckpointSpec(**bad))
