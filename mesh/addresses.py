"""Parsing "host:port" strings, resolving seeds, and choosing the address to advertise."""

from __future__ import annotations

import logging
import socket

log = logging.getLogger(__name__)

WILDCARD_HOSTS = {"", "*", "0.0.0.0", "::", "[::]"}


def split_host_port(value: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port); ValueError with the offending text."""
    if not isinstance(value, str) or ":" not in value:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    host, _, port_text = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"bad port in {value!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range in {value!r}")
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


def advertise_host(bind_host: str, seeds: list[str]) -> str:
    """A host others can reach us on when bound to a wildcard address."""
    if bind_host not in WILDCARD_HOSTS:
        return bind_host
    for target in [*(split_host_port(s)[0] for s in seeds), "192.0.2.1"]:
        try:
            family = socket.AF_INET6 if ":" in target else socket.AF_INET
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                probe.connect((target, 9))  # no packet is sent; picks the outgoing interface
                return probe.getsockname()[0]
        except OSError:
            continue
    return "127.0.0.1"
