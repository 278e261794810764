"""Two real vLLM instances: A loads from disk and serves, B pulls its weights from A."""

import json

import pytest

from loader.integration.vllm_compat import VLLM_VERSION
from tests.support.vllm_process import VllmServer, free_port

pytestmark = pytest.mark.e2e

PROMPTS = ["Hello world", "Once upon a time", "The quick brown fox", "0 1 2 3"]


def _logprobs(server: VllmServer) -> list:
    out = []
    for prompt in PROMPTS:
        lp = server.complete(prompt, max_tokens=6, logprobs=5)["logprobs"]
        out.append((lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]))
    return out


@pytest.fixture(scope="module")
def instance_a(tiny_checkpoint, tmp_path_factory):
    port = free_port()
    server = VllmServer(
        model=tiny_checkpoint,
        log_path=tmp_path_factory.mktemp("a") / "A.log",
        extra_config={"LISTEN_PORT": port},
        listen_port=port,
    )
    server.start().wait_ready()
    yield server
    server.stop()


@pytest.mark.compat
def test_b_loads_from_a_and_answers_identically(instance_a, tiny_checkpoint, tmp_path):
    [a_result] = instance_a.result_lines()
    assert a_result["source"] == "disk" and a_result["rank"] == 0
    source = f"127.0.0.1:{instance_a.listen_port}"
    with VllmServer(
        model=tiny_checkpoint, log_path=tmp_path / "B.log",
        extra_config={"SOURCE": [{"device_id": 0, "sources": [source]}]},
    ) as b:
        b.wait_ready()
        [b_result] = b.result_lines()
        assert b_result["source"] == "peer", b_result
        assert b_result["peer"] == source
        assert b_result["fallback_reason"] is None
        assert b_result["bytes"] == a_result["bytes"] > 0
        assert b_result["vllm"] == a_result["vllm"] == VLLM_VERSION
        assert _logprobs(b) == _logprobs(instance_a)
        # static keys without a secret work, and both sides say what that exposes
        assert "serving weights without authentication" in instance_a.log_text()
        assert "fetching weights without authentication" in b.log_text()


def test_dead_source_falls_back_to_disk_with_reason(instance_a, tiny_checkpoint, tmp_path):
    dead = f"127.0.0.1:{free_port()}"
    with VllmServer(
        model=tiny_checkpoint, log_path=tmp_path / "B.log",
        extra_config={"SOURCE": [{"device_id": 0, "sources": [dead]}], "connect_timeout_s": 2,
                      "handshake_timeout_s": 3},
    ) as b:
        b.wait_ready()
        [b_result] = b.result_lines()
        assert b_result["source"] == "disk"
        assert b_result["peer"] is None
        assert dead in b_result["fallback_reason"]
        assert _logprobs(b)[:1] == _logprobs(instance_a)[:1]


def test_bad_extra_config_is_rejected_naming_the_key(tiny_checkpoint, tmp_path):
    server = VllmServer(
        model=tiny_checkpoint, log_path=tmp_path / "bad.log",
        extra_config={"LISTEN_PORT": -1},
    ).start()
    with pytest.raises(RuntimeError, match="exited"):
        server.wait_ready(timeout_s=180)
    assert "LISTEN_PORT" in server.log_text()
    server.stop()


def test_result_line_is_one_json_object_per_rank(instance_a):
    text = instance_a.log_text()
    lines = [line for line in text.splitlines() if "netloader result: " in line]
    assert len(lines) == 1
    payload = json.loads(lines[0].split("netloader result: ", 1)[1])
    assert set(payload) >= {"rank", "source", "peer", "bytes", "seconds", "fallback_reason"}
    assert isinstance(payload["seconds"], float)


def _weightless_copy(checkpoint: str, dest) -> str:
    """config + tokenizer only: what a client that never downloaded the weights holds."""
    import shutil
    from pathlib import Path

    dest.mkdir()
    for f in Path(checkpoint).iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, dest / f.name)
    return str(dest)


def test_client_without_weight_files_loads_by_model_id_or_fails_clearly(tiny_checkpoint, tmp_path):
    model_id = {"MODEL": "tiny-llama@seed0"}
    port = free_port()
    a = VllmServer(model=tiny_checkpoint, log_path=tmp_path / "A.log",
                   extra_config={"LISTEN_PORT": port, **model_id})
    bare = _weightless_copy(tiny_checkpoint, tmp_path / "bare")
    try:
        a.start().wait_ready()
        source = {"SOURCE": [{"device_id": 0, "sources": [f"127.0.0.1:{port}"]}]}
        with VllmServer(model=bare, log_path=tmp_path / "B.log",
                        extra_config={**source, **model_id}) as b:
            b.wait_ready()
            [result] = b.result_lines()
            assert result["source"] == "peer", result
            prompt = "Hello world"
            assert b.complete(prompt)["logprobs"] == a.complete(prompt)["logprobs"]
        orphan = VllmServer(model=bare, log_path=tmp_path / "C.log",
                            extra_config={**source, "MODEL": "some-other-model@v2"}).start()
        with pytest.raises(RuntimeError, match="exited"):
            orphan.wait_ready(timeout_s=180)
        assert "no peer served the weights" in orphan.log_text()
        # the source refused it: its MODEL makes another fingerprint
        assert "refused: fingerprint mismatch: source " in orphan.log_text()
        orphan.stop()
    finally:
        a.stop()
