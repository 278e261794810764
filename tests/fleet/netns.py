"""Simulated hosts: one network namespace per host, veth links to a bridge, shaped by tc.

    with NetnsNetwork(hosts=9, rate_mbit=300) as net:
        ... in a forked child: net.enter(3)   # from now on this process is "on" host 3

Host i gets 10.77.0.(i+1)/24 on its eth0; its link is shaped in both directions (host
egress = uplink, bridge-port egress = downlink). Everything lives in namespaces this
object creates (names carry the pid) and is deleted on exit, also after errors.
`LoopbackNetwork` is the fallback when namespaces cannot be created (not root, no
`ip`/`tc`): every host is 127.0.0.1 and nothing is shaped.

`gossip_bind(host, slot)` is the fixed "addr:port" of host's gossip agent number `slot`
(a fleet runs one mesh per wave), known before any process starts so that seeds can be
handed out in advance: GOSSIP_PORT + slot on the host's own address in a namespace,
distinct free ports of 127.0.0.1 on loopback.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import shutil
import socket
import subprocess

SUBNET = "10.77.0"
GOSSIP_PORT = 7946
_TIMEOUT_S = 10
_CLONE_NEWNET = 0x40000000


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=_TIMEOUT_S)


class LoopbackNetwork:
    shaped = False
    description = "loopback 127.0.0.1, unshaped"

    def __init__(self, hosts: int) -> None:
        self.hosts = hosts
        self._ports: dict[tuple[int, int], int] = {}

    def address(self, i: int) -> str:
        return "127.0.0.1"

    def gossip_bind(self, i: int, slot: int) -> str:
        """All hosts share 127.0.0.1: each (host, slot) gets a port that was free when
        first asked for (a fixed port could clash with anything else on this machine)."""
        if (i, slot) not in self._ports:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                self._ports[(i, slot)] = s.getsockname()[1]
        return f"127.0.0.1:{self._ports[(i, slot)]}"

    def enter(self, i: int) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


class NetnsNetwork:
    shaped = True

    def __init__(self, hosts: int, rate_mbit: int) -> None:
        if not 1 <= hosts <= 200:
            raise ValueError("hosts must be in 1..200")
        self.hosts = hosts
        self.rate_mbit = rate_mbit
        tag = f"nlm{os.getpid()}"
        self.switch = f"{tag}-sw"
        self.names = [f"{tag}-h{i}" for i in range(hosts)]
        self._created: list[str] = []
        self.description = (
            f"{hosts} network namespaces, veth to a bridge, tc tbf {rate_mbit} Mbit/s "
            "each way per host link (no added latency: no sch_netem here)"
        )

    def address(self, i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    def gossip_bind(self, i: int, slot: int) -> str:
        return f"{self.address(i)}:{GOSSIP_PORT + slot}"

    def enter(self, i: int) -> None:
        """Move the calling (single-threaded, e.g. just forked) process into host i's
        namespace. Forking beats `ip netns exec python ...`: torch/vLLM are imported
        once, not once per host."""
        fd = os.open(f"/run/netns/{self.names[i]}", os.O_RDONLY)
        try:
            if _libc().setns(fd, _CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns({self.names[i]}): {os.strerror(err)}")
        finally:
            os.close(fd)
        # gloo picks its address from the hostname (127.0.0.1 inside a namespace)
        os.environ["GLOO_SOCKET_IFNAME"] = "eth0"

    def __enter__(self):
        atexit.register(self.cleanup)
        try:
            self._create()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()

    def _netns_add(self, name: str) -> None:
        _run("ip", "netns", "add", name)
        self._created.append(name)

    def _create(self) -> None:
        sw = self.switch
        self._netns_add(sw)
        _run("ip", "-n", sw, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", sw, "link", "set", "br0", "up")
        # token bucket: sch_netem is missing from some kernels (this one), tbf is common;
        # the burst holds a few GSO segments, the queue ~10 ms at the link rate
        shape = ["tbf", "rate", f"{self.rate_mbit}mbit", "burst", "256kb", "latency", "10ms"]
        for i, ns in enumerate(self.names):
            self._netns_add(ns)
            port = f"p{i}"
            _run(
                "ip",
                "link",
                "add",
                "eth0",
                "netns",
                ns,
                "type",
                "veth",
                "peer",
                "name",
                port,
                "netns",
                sw,
            )
            _run("ip", "-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("ip", "-n", ns, "link", "set", "eth0", "up")
            _run("ip", "-n", sw, "link", "set", port, "master", "br0")
            _run("ip", "-n", sw, "link", "set", port, "up")
            _run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", "root", *shape)
            _run("ip", "netns", "exec", sw, "tc", "qdisc", "add", "dev", port, "root", *shape)

    def cleanup(self) -> None:
        """Delete every namespace we created (their veths and qdiscs go with them)."""
        while self._created:
            name = self._created.pop()
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=_TIMEOUT_S)


def netns_unavailable_reason() -> str | None:
    """None when namespaces, veth and tc work here; else why not."""
    if os.geteuid() != 0:
        return "not root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"{tool!r} not found"
    probe = NetnsNetwork(hosts=1, rate_mbit=100)
    try:
        with probe:
            pass
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        return f"cannot create a shaped namespace: {detail.decode(errors='replace').strip() or exc}"
    return None
