"""A weight server that cannot start (its port is taken) leaves the rank loading from disk
and the process free to go on: nothing it opened is left for the garbage collector, whose
collection of an open ZeroMQ context can block for good (vLLM's loader calls gc.collect()).

Run in a subprocess, so a blocked collection fails the test instead of hanging the suite."""

import json
import socket
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import gc, json, logging, socket, sys, time
    from torch import nn
    from vllm.config.load import LoadConfig
    from loader.integration import serving
    from loader.integration.identity import RankIdentity
    from loader.integration.model_loader import NetloaderModelLoader

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    port = int(sys.argv[1])
    secret = sys.argv[2] or None

    class DiskLoader:
        loads = 0
        def load_weights(self, model, model_config):
            DiskLoader.loads += 1

    extra = {"LISTEN_PORT": port}
    if secret:
        extra["secret_file"] = secret
    loader = NetloaderModelLoader(LoadConfig(load_format="netloader", model_loader_extra_config=extra))
    loader._disk = DiskLoader()
    identity = RankIdentity(rank=0, tp=1, pp=1, device="cpu", fingerprint="f" * 64)
    result, relay = loader._fill_weights(nn.Linear(4, 4), None, identity, None, time.monotonic())
    again = serving.start_serving({"w": nn.Linear(4, 4).weight.data}, identity, loader.config)
    gc.collect()
    print(json.dumps({
        "source": result.source, "relay": relay is not None, "served": again is not None,
        "disk_loads": DiskLoader.loads,
    }))
    """
)


@pytest.mark.parametrize("secured", [False, True], ids=["no-secret", "cluster-secret"])
def test_taken_port_loads_from_disk_says_why_and_blocks_nothing(tmp_path, secured):
    secret = ""
    if secured:
        from mesh.security import write_secret_file

        secret = str(tmp_path / "secret")
        write_secret_file(secret)
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = subprocess.run(
            [sys.executable, "-c", SCRIPT, str(port), secret],
            capture_output=True, text=True, timeout=90,
        )
    assert run.returncode == 0, run.stderr[-3000:]
    outcome = json.loads(run.stdout.strip().splitlines()[-1])
    assert outcome["source"] == "disk" and outcome["disk_loads"] == 1
    assert not outcome["relay"] and not outcome["served"]
    assert run.stderr.count("weight server did not start: Address already in use") == 2, run.stderr[-3000:]
    assert str(port) in run.stderr
