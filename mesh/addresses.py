"""The one place that parses "host:port" strings and host names (for the mesh, the wire and
the loader's config), resolves seeds, and guesses the local address others can reach."""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import Iterable

log = logging.getLogger(__name__)

WILDCARD_HOSTS = {"", "*", "0.0.0.0", "::", "[::]"}

# a host name or IPv4 address, or an IPv6 address (without its brackets)
_HOST_RE = re.compile(r"[A-Za-z0-9_.-]{1,253}|[0-9A-Fa-f:.]{2,45}")
_PORT_RE = re.compile(r"[0-9]{1,5}")
# an address routed like the public internet; connecting a UDP socket to it sends nothing
_ROUTABLE_PROBE = "192.0.2.1"


def valid_host(host) -> bool:
    return isinstance(host, str) and _HOST_RE.fullmatch(host) is not None


def split_host_port(value, *, min_port: int = 0, wildcard: bool = False) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port); ValueError naming the offending text.

    `wildcard` also admits the bind-only hosts "" and "*"; `min_port` 1 refuses port 0."""
    if not isinstance(value, str) or ":" not in value:
        raise ValueError(f'expected "host:port", got {value!r}')
    host, _, port_text = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    host_ok = valid_host(host) or (wildcard and host in WILDCARD_HOSTS)
    if not host_ok or _PORT_RE.fullmatch(port_text) is None:
        raise ValueError(f'expected "host:port", got {value!r}')
    port = int(port_text)
    if not min_port <= port <= 65535:
        raise ValueError(f"port {port} out of range in {value!r}")
    return host, port


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def zmq_endpoint(addr: str) -> str:
    return f"tcp://{addr}"


def resolve_seeds(specs: list[str]) -> list[str]:
    """Every address each seed name resolves to; unresolvable seeds are logged and skipped."""
    resolved: list[str] = []
    for spec in specs:
        try:
            host, port = split_host_port(spec.strip())
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, ValueError) as e:
            log.warning("seed %r cannot be resolved: %s", spec, e)
            continue
        for family, _, _, _, sockaddr in infos:
            if family in (socket.AF_INET, socket.AF_INET6):
                resolved.append(join_host_port(sockaddr[0], port))
    return list(dict.fromkeys(resolved))


def parse_seed_list(value: str | list[str] | None) -> list[str]:
    if not value:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    return [item.strip() for item in items if item.strip()]


def outbound_ip(targets: Iterable[str] = ()) -> str:
    """The local address traffic to the first reachable target (else the internet) leaves from."""
    for target in [*targets, _ROUTABLE_PROBE]:
        try:
            family = socket.AF_INET6 if ":" in target else socket.AF_INET
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                probe.connect((target, 9))  # no packet is sent; picks the outgoing interface
                return probe.getsockname()[0]
        except OSError:
            continue
    return "127.0.0.1"


def advertise_host(bind_host: str, seeds: list[str]) -> str:
    """A host others can reach us on: the bind host, or when that is a wildcard the address
    that routes to the (resolved) seeds."""
    if bind_host not in WILDCARD_HOSTS:
        return bind_host
    return outbound_ip(split_host_port(s)[0] for s in seeds)
