"""One real vLLM server with a plain --load-format netloader: comes up from disk, answers a
completion, and opens no weight server (nothing asked it to serve)."""

import pytest

from tests.support.vllm_process import VllmServer

pytestmark = pytest.mark.e2e


def test_server_with_netloader_format_answers_a_completion(tiny_checkpoint, tmp_path):
    with VllmServer(model=tiny_checkpoint, log_path=tmp_path / "server.log") as server:
        server.wait_ready()
        choice = server.complete("Hello world", max_tokens=4)
        assert choice["finish_reason"] == "length"
        assert len(choice["logprobs"]["token_logprobs"]) == 4
        log = server.log_text()
        assert "Registered model loader" in log
        [result] = server.result_lines()
        assert result["source"] == "disk" and result["rank"] == 0
        assert "serving weights to other instances is off" in log
        assert "netloader server rank" not in log  # no weight server started
