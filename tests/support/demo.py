"""`make demo`: instance B finds running instance A through the gossip mesh and takes its weights.

1. build a tiny Llama checkpoint locally (nothing is downloaded) and a cluster secret
   (`mesh keygen`)
2. start A (loads from disk, joins the mesh as its seed, serves its weights)
3. start B with nothing but A's gossip address: it finds A and pulls the weights
4. show `mesh status`, B's result line, and both answers to one prompt with logprobs
5. shut both down; B and A leave the mesh gracefully
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mesh.security import write_secret_file
from tests.support.tiny_checkpoint import build_checkpoint
from tests.support.vllm_process import VllmServer, free_port

PROMPT = "Once upon a time"
GRACEFUL = ["--shutdown-timeout", "5"]  # lets workers leave the mesh on shutdown


def say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def mesh_status(seed: str, secret: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "mesh.cli", "status", "--seeds", seed, "--secret-file", secret],
        capture_output=True, text=True, timeout=60,
    )
    return out.stdout if out.returncode == 0 else f"mesh status failed: {out.stderr.strip()}"


def side_by_side(a: dict, b: dict) -> str:
    rows = [f"{'token':>12} | {'A logprob':>12} | {'B logprob':>12}"]
    la, lb = a["logprobs"], b["logprobs"]
    for tok, pa, pb in zip(la["tokens"], la["token_logprobs"], lb["token_logprobs"], strict=True):
        rows.append(f"{tok!r:>12} | {pa:12.6f} | {pb:12.6f}")
    return "\n".join(rows)


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="netloader-demo-"))
    model = str(build_checkpoint(work / "tiny"))
    secret = work / "cluster.secret"
    write_secret_file(str(secret))  # what `mesh keygen PATH` writes
    seed = f"127.0.0.1:{free_port()}"
    say(f"checkpoint {model}; logs in {work}")

    a = VllmServer(
        model=model, log_path=work / "A.log", extra_args=GRACEFUL,
        extra_config={"mesh": {"bind": seed, "secret_file": str(secret), "name": "A"}},
    )
    b = VllmServer(
        model=model, log_path=work / "B.log", extra_args=GRACEFUL,
        extra_config={"mesh": {"seeds": [seed], "secret_file": str(secret), "name": "B"}},
    )
    try:
        say(f"starting A (from disk, gossip at {seed}) ...")
        started = time.monotonic()
        a.start().wait_ready()
        say(f"A ready in {time.monotonic() - started:.1f}s: {json.dumps(a.result_lines()[0])}")
        say(f"starting B with only the seed address {seed} ...")
        started = time.monotonic()
        b.start().wait_ready()
        say(f"B ready in {time.monotonic() - started:.1f}s")
        say("mesh status:\n" + mesh_status(seed, str(secret)))
        [result] = b.result_lines()
        say(f"B's result line: {json.dumps(result)}")
        answer_a, answer_b = a.complete(PROMPT), b.complete(PROMPT)
        say(f"prompt {PROMPT!r}, temperature 0")
        say(f"A: {answer_a['text']!r}   B: {answer_b['text']!r}")
        print(side_by_side(answer_a, answer_b))
        same = answer_a["logprobs"] == answer_b["logprobs"]
        say("identical logprobs: " + ("yes" if same else "NO"))
        ok = result["source"] == "peer" and same
    finally:
        say("shutting down B and A ...")
        b.stop()
        a.stop()
    say("done" if ok else "FAILED: B did not load identical weights from A")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
