import pytest

from tests.support.tiny_checkpoint import CheckpointSpec, build_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """The tiny Llama every e2e test serves (hidden 256, 2 layers, float32, seed 0)."""
    return str(build_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", CheckpointSpec()))
