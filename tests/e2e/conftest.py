import pytest

from mesh.security import write_secret_file


@pytest.fixture(scope="module")
def secret(tmp_path_factory):
    """A cluster secret file for the module's instances (made with `mesh keygen`'s writer)."""
    path = tmp_path_factory.mktemp("secret") / "cluster.secret"
    write_secret_file(str(path))
    return str(path)
