"""Real agents as separate processes on 127.0.0.1 (ZeroMQ, CURVE). Bounded by timeouts."""

import os
import select
import signal
import subprocess
import sys
import time

import orjson
import pytest

from mesh.api import MeshAgent
from mesh.security import load_cluster_keys, write_secret_file
from mesh.status import StatusError, query_members

pytestmark = pytest.mark.loopback

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Agents:
    """Agent processes; they share the cluster secret `secret_file` unless told otherwise."""

    def __init__(self, secret_file):
        self.procs = {}
        self.secret_file = secret_file
        self.keys = load_cluster_keys(secret_file)

    def start(self, name, seeds=(), meta=(), secret_file=None, insecure=False):
        cmd = [sys.executable, "-m", "mesh.cli", "agent", "--bind", "127.0.0.1:0", "--name", name,
               "--log-level", "WARNING"]
        if seeds:
            cmd += ["--seeds", ",".join(seeds)]
        if meta:
            cmd += ["--meta", *meta]
        cmd += ["--insecure"] if insecure else ["--secret-file", secret_file or self.secret_file]
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.procs[name] = proc
        return proc

    def addr(self, name, timeout=20.0):
        """Read the 'listening on HOST:PORT' line the agent prints at start."""
        proc = self.procs[name]
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        assert ready, f"agent {name} did not start"
        line = proc.stdout.readline().decode()
        assert "listening on" in line, line
        return line.rsplit(" ", 1)[1].strip()

    def stop_all(self):
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs.values():
            proc.wait(10)


@pytest.fixture(scope="module")
def secret(tmp_path_factory):
    path = tmp_path_factory.mktemp("mesh") / "cluster.secret"
    write_secret_file(str(path))
    return str(path)


@pytest.fixture
def agents(secret):
    group = Agents(secret)
    yield group
    group.stop_all()


def wait_for(predicate, timeout, interval=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def states(addr, keys):
    try:
        _, rows = query_members([addr], keys, timeout_s=1.0)
    except StatusError:
        return {}
    return {r["name"]: r["state"] for r in rows}


def start_cluster(agents, n, prefix="a", **kwargs):
    agents.start(f"{prefix}0", **kwargs)
    first = agents.addr(f"{prefix}0")
    addrs = {f"{prefix}0": first}
    for i in range(1, n):
        agents.start(f"{prefix}{i}", seeds=[first], **kwargs)
    for i in range(1, n):
        addrs[f"{prefix}{i}"] = agents.addr(f"{prefix}{i}")
    return addrs


def all_alive(addrs, names, keys):
    return all(all(states(a, keys).get(n) == "alive" for n in names) for a in addrs.values())


def test_status_json_contract_and_table(agents):
    agents.start("src", meta=["fingerprint=0123456789abcdef", "tp=2", "pp=1", "rank=1", "ready=true",
                              "endpoint=127.0.0.1:9100", "load=0.25", "zone=z1"])
    seed = agents.addr("src")
    agents.start("dst", seeds=[seed])
    agents.addr("dst")
    assert wait_for(lambda: states(seed, agents.keys).get("dst") == "alive", 15)
    status = [sys.executable, "-m", "mesh.cli", "status", "--seeds", seed, "--secret-file", agents.secret_file]
    out = subprocess.run([*status, "--json"], cwd=REPO, capture_output=True, timeout=30)
    assert out.returncode == 0, out.stderr
    rows = orjson.loads(out.stdout)
    assert isinstance(rows, list) and {r["name"] for r in rows} == {"src", "dst"}
    src = next(r for r in rows if r["name"] == "src")
    assert src["addr"] == seed and src["state"] == "alive" and isinstance(src["incarnation"], int)
    assert src["meta"] == {"fingerprint": "0123456789abcdef", "tp": 2, "pp": 1, "rank": 1, "ready": True,
                           "endpoint": "127.0.0.1:9100", "load": 0.25, "zone": "z1"}
    table = subprocess.run(status, cwd=REPO, capture_output=True, timeout=30, text=True)
    assert table.returncode == 0
    assert "0123456789a" in table.stdout and "2x1" in table.stdout and "127.0.0.1:9100" in table.stdout


def test_status_without_reachable_agent_fails_with_one_line(secret):
    out = subprocess.run([sys.executable, "-m", "mesh.cli", "status", "--seeds", "127.0.0.1:9",
                          "--secret-file", secret, "--timeout", "1"],
                         cwd=REPO, capture_output=True, timeout=30, text=True)
    assert out.returncode != 0
    assert len(out.stderr.strip().splitlines()) == 1 and "no agent answered" in out.stderr


def test_kill9_is_detected_dead_and_sigterm_leaves(agents):
    addrs = start_cluster(agents, 5)
    keys = agents.keys
    assert wait_for(lambda: all_alive(addrs, addrs, keys), 20)
    agents.procs["a3"].send_signal(signal.SIGKILL)
    watcher = addrs["a0"]
    assert wait_for(lambda: all(states(addrs[n], keys).get("a3") == "dead" for n in ("a0", "a1", "a2", "a4")), 30)
    agents.procs["a4"].send_signal(signal.SIGTERM)
    assert agents.procs["a4"].wait(10) == 0
    assert wait_for(lambda: all(states(addrs[n], keys).get("a4") == "left" for n in ("a0", "a1", "a2")), 10)
    assert states(watcher, keys)["a1"] == "alive"


def test_restart_under_same_name_is_accepted(agents):
    addrs = start_cluster(agents, 3)
    assert wait_for(lambda: all_alive(addrs, addrs, agents.keys), 20)
    agents.procs["a2"].send_signal(signal.SIGKILL)
    agents.procs["a2"].wait(10)
    agents.start("a2", seeds=[addrs["a0"]])
    addrs["a2"] = agents.addr("a2")  # a new port: the same name moves to a new address

    def a2_seen_at_new_address():
        for addr in addrs.values():
            try:
                _, rows = query_members([addr], agents.keys, timeout_s=1.0)
            except StatusError:
                return False
            row = next((r for r in rows if r["name"] == "a2"), None)
            if row is None or row["state"] != "alive" or row["addr"] != addrs["a2"]:
                return False
        return True

    assert wait_for(a2_seen_at_new_address, 20)


def test_wrong_secret_cannot_join_or_read(agents, tmp_path):
    good, keys = agents.secret_file, agents.keys
    bad = tmp_path / "bad"
    write_secret_file(str(bad))
    addrs = start_cluster(agents, 2)
    assert wait_for(lambda: all_alive(addrs, addrs, keys), 20)
    agents.start("intruder", seeds=[addrs["a0"]], secret_file=str(bad))
    intruder = agents.addr("intruder")
    agents.start("plain", seeds=[addrs["a0"]], insecure=True)
    plain = agents.addr("plain")
    time.sleep(3.0)
    assert set(states(addrs["a0"], keys)) == {"a0", "a1"}
    assert set(states(intruder, load_cluster_keys(str(bad)))) == {"intruder"}
    assert set(states(plain, None)) == {"plain"}
    assert states(addrs["a0"], None) == {}  # without the secret the mesh does not even answer
    denied = subprocess.run([sys.executable, "-m", "mesh.cli", "status", "--seeds", addrs["a0"],
                             "--secret-file", str(bad), "--timeout", "1"], cwd=REPO, capture_output=True)
    assert denied.returncode != 0
    allowed = subprocess.run([sys.executable, "-m", "mesh.cli", "status", "--seeds", addrs["a0"],
                              "--secret-file", good, "--json"], cwd=REPO, capture_output=True)
    assert allowed.returncode == 0


def test_thirty_agents_converge(agents):
    started = time.monotonic()
    addrs = start_cluster(agents, 30, prefix="m")
    all_started = time.monotonic()
    converged = wait_for(lambda: all_alive(addrs, addrs, agents.keys), 30, interval=0.2)
    done = time.monotonic()
    print(f"\n30 agents: started in {all_started - started:.2f}s, "
          f"converged {done - all_started:.2f}s after the last started")
    assert converged


def test_agent_with_unreachable_seed_starts_and_reports_not_joined(secret):
    agent = MeshAgent(bind="127.0.0.1:0", seeds=["127.0.0.1:9", "no-such-host.invalid:7946"], name="lonely",
                      secret_file=secret)
    agent.start()
    try:
        assert agent.running
        assert agent.wait_joined(1.0) is False
        assert [m.name for m in agent.members()] == ["lonely"]
    finally:
        agent.stop()
    assert not agent.running


def test_a_reader_waiting_for_a_change_wakes_when_a_peer_advertises(secret):
    """In-process agents: `wait_for_change` returns once the peer's new metadata is in the
    view (the peer's advertise wakes its own thread, so it is gossiped at once)."""
    first = MeshAgent(bind="127.0.0.1:0", seeds=[], name="first", secret_file=secret)
    first.start()
    second = MeshAgent(bind="127.0.0.1:0", seeds=[first.addr], name="second", secret_file=secret)
    second.start()
    try:
        assert wait_for(lambda: {m.name for m in first.members()} == {"first", "second"}, 20)
        second.advertise({"state": "receiving"})
        deadline = time.monotonic() + 30
        seen = None
        while time.monotonic() < deadline:
            first.wait_for_change(5.0)
            seen = next(m.meta.get("state") for m in first.members() if m.name == "second")
            if seen == "receiving":
                break
        assert seen == "receiving"
    finally:
        second.stop()
        first.stop()
