"""`make demo`: a tiny checkpoint, one vLLM instance with --load-format netloader, a completion."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from loader.tiny_checkpoint import build_checkpoint
from loader.vllm_process import VllmServer

PROMPT = "Once upon a time"


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="netloader-demo-"))
    model = str(build_checkpoint(work / "tiny"))
    print(f"[demo] checkpoint: {model}")
    server = VllmServer(model=model, log_path=work / "A.log")
    print(f"[demo] starting instance A on {server.url} (log: {server.log_path})")
    with server:
        server.wait_ready()
        choice = server.complete(PROMPT)
        print(f"[demo] A answers {PROMPT!r} -> {choice['text']!r}")
        print(json.dumps(choice["logprobs"]["token_logprobs"]))
    print("[demo] done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
