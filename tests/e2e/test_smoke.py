"""One real vLLM server with --load-format netloader: comes up, answers a completion."""

import pytest

from loader.vllm_process import VllmServer

pytestmark = pytest.mark.e2e


def test_server_with_netloader_format_answers_a_completion(tiny_checkpoint, tmp_path):
    with VllmServer(model=tiny_checkpoint, log_path=tmp_path / "server.log") as server:
        server.wait_ready()
        choice = server.complete("Hello world", max_tokens=4)
        assert choice["finish_reason"] == "length"
        assert len(choice["logprobs"]["token_logprobs"]) == 4
        assert "Registered model loader" in server.log_text()
