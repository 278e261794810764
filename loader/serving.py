"""After loading, every rank serves its weights to the next instance (one server per rank).

Only when the config asks for it (`NetloaderConfig.serves`): a plain `--load-format
netloader` opens no port.
"""

from __future__ import annotations

import logging
import threading

import torch

from loader.config import NetloaderConfig
from loader.identity import RankIdentity
from loader.process_exit import on_process_exit
from mesh.addresses import join_host_port

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_servers: dict[int, object] = {}
_keys_cache: dict[str | None, object] = {}


def cluster_keys(config: NetloaderConfig):
    """CURVE keys from the cluster secret, or None (unauthenticated: callers warn)."""
    path = config.secret_file
    with _lock:
        if path not in _keys_cache:
            from mesh.security import load_cluster_keys

            _keys_cache[path] = load_cluster_keys(path)
        return _keys_cache[path]


def start_serving(
    tensors: dict[str, torch.Tensor] | None, identity: RankIdentity, config: NetloaderConfig
):
    """Start this rank's weight server. Never raises: a rank that cannot serve still runs."""
    from loader.server import WeightServer

    return _start(WeightServer, tensors, identity, config, "serving weights")


def start_relay(
    tensors: dict[str, torch.Tensor] | None, identity: RankIdentity, config: NetloaderConfig
):
    """Start this rank's server before its weights arrive: a RelayServer over the tensors
    about to be fetched, forwarding each bucket once verified (see loader.relay)."""
    from loader.relay import RelayServer

    return _start(RelayServer, tensors, identity, config, "serving (verified buckets while still loading)")


def _start(server_cls, tensors, identity: RankIdentity, config: NetloaderConfig, what: str):
    if not config.serves:
        return None
    if tensors is None or identity.fingerprint is None:
        logger.warning(
            "rank %d: weights not servable (no fingerprint or meta tensors)", identity.rank
        )
        return None
    try:
        keys = cluster_keys(config)
        server = server_cls(
            tensors,
            identity.fingerprint,
            identity.rank,
            config.settings,
            keys=keys,
            host=config.settings.listen_host,
            port=config.port_for_rank(identity.rank),
            output_prefix=config.output_prefix,
        )
        server.start()
    except Exception as exc:
        logger.error("rank %d: weight server did not start: %s", identity.rank, exc)
        return None
    with _lock:
        old = _servers.pop(identity.rank, None)
        _servers[identity.rank] = server
    if old is not None:
        old.stop()
    logger.info("rank %d: %s on %s", identity.rank, what, server.endpoint)
    if keys is None:
        port = int(server.endpoint.rpartition(":")[2])
        logger.warning(
            "rank %d: serving weights without authentication on %s: anyone who can reach it "
            "can read the weights; set secret_file (a file made with `mesh keygen PATH`, the "
            "same on every instance) to require the cluster secret",
            identity.rank,
            join_host_port(config.settings.listen_host, port),
        )
    return server


def stop_server(server) -> None:
    with _lock:
        for rank, running in list(_servers.items()):
            if running is server:
                del _servers[rank]
    server.stop()


def stop_all() -> None:
    with _lock:
        servers = list(_servers.values())
        _servers.clear()
    for server in servers:
        try:
            server.stop()
        except Exception as exc:
            logger.warning("weight server stop failed: %s", exc)


on_process_exit(stop_all)
