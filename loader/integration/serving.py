"""After loading, every rank serves its weights to the next instance (one server per rank).

Only when the config asks for it (`NetloaderConfig.serves`): a plain `--load-format
netloader` opens no port.
"""

from __future__ import annotations

import logging
import threading

import torch

from loader.config import NetloaderConfig
from loader.integration.identity import RankIdentity
from loader.integration.process_exit import on_process_exit
from mesh.addresses import join_host_port, split_host_port

log = logging.getLogger(__name__)

_lock = threading.Lock()
_servers: dict[int, object] = {}
_keys_cache: dict[str | None, object] = {}


class WarmUp:
    """Between the end of a rank's load and the end of vLLM's warm-up (memory profiling,
    KV cache sizing, compilation, graph capture) a source takes no new clients: their
    buffers would skew the profile and their threads could break a graph capture.
    Only engaged when the plugin could hook vLLM's warm-up (`watch()`); otherwise a
    source never waits for a signal that would not come."""

    def __init__(self) -> None:
        self._watched = False
        self._warming = threading.Event()
        self._after: list = []

    def watch(self) -> None:
        self._watched = True

    @property
    def watched(self) -> bool:
        return self._watched

    def begin(self) -> None:
        if self._watched:
            self._warming.set()

    def after(self, callback) -> None:
        """Call `callback()` once the warm-up is over (vLLM has compiled)."""
        with _lock:
            self._after.append(callback)

    def done(self) -> None:
        self._warming.clear()
        with _lock:
            callbacks, self._after = self._after, []
        for callback in callbacks:
            try:
                callback()
            except Exception:
                log.exception("netloader: after-warm-up step failed")

    def refusal(self) -> str | None:
        if self._warming.is_set():
            return "source busy (warming up: memory profiling, compilation, graph capture)"
        return None


warm_up = WarmUp()


def served_tensors(
    raw: dict[str, torch.Tensor], model: torch.nn.Module, to_host: bool | None = None
) -> tuple[dict[str, torch.Tensor], int]:
    """What a rank serves after `process_weights_after_loading`, and the bytes kept only
    for that. A raw tensor whose storage the model still uses costs nothing extra. One
    that processing replaced (oneDNN packing on CPU; NZ casts, quantized and MoE repacks
    on accelerators) is a copy kept only to be served: on an accelerator it moves to
    host memory (pinned where possible), so serving never doubles device memory.
    `to_host` overrides that choice (default: for tensors not already on the CPU)."""
    live = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    served: dict[str, torch.Tensor] = {}
    retained = 0
    for name, t in raw.items():
        if t.untyped_storage().data_ptr() in live:
            served[name] = t
            continue
        retained += t.numel() * t.element_size()
        if to_host if to_host is not None else t.device.type != "cpu":
            t = t.to("cpu", copy=True)
            if torch.accelerator.is_available():
                t = t.pin_memory()
        served[name] = t
    return served, retained


def cluster_keys(config: NetloaderConfig):
    """CURVE keys from the cluster secret, or None (unauthenticated: callers warn)."""
    path = config.secret_file
    with _lock:
        if path not in _keys_cache:
            from mesh.security import load_cluster_keys

            _keys_cache[path] = load_cluster_keys(path)
        return _keys_cache[path]


def start_serving(
    tensors: dict[str, torch.Tensor] | None,
    identity: RankIdentity,
    config: NetloaderConfig,
    device: torch.device | None = None,
    layout=None,
):
    """Start this rank's weight server. Never raises: a rank that cannot serve still runs.
    `device`: the transfer device when some tensors are kept in host memory. `layout`
    (loader.transfer.layout.ShardLayout): lets ranks of other shapes reshard from it."""
    from loader.transfer.server import WeightServer

    return _start(WeightServer, tensors, identity, config, "serving weights", device, layout)


def start_relay(
    tensors: dict[str, torch.Tensor] | None, identity: RankIdentity, config: NetloaderConfig,
    layout=None,
):
    """Start this rank's server before its weights arrive: a WeightServer over the tensors
    about to be fetched whose strategy, a relay (`server.strategy`, the fetch's observer),
    forwards each bucket once verified (see loader.distribution.relay)."""
    from loader.distribution.relay import relay_server

    return _start(
        relay_server, tensors, identity, config, "serving (verified buckets while still loading)",
        layout=layout,
    )


def _start(
    make_server, tensors, identity: RankIdentity, config: NetloaderConfig, what: str, device=None,
    layout=None,
):
    if not config.serves:
        return None
    if tensors is None or identity.fingerprint is None:
        log.warning(
            "rank %d: weights not servable (no fingerprint or meta tensors)", identity.rank
        )
        return None
    try:
        keys = cluster_keys(config)
        server = make_server(
            tensors,
            identity.fingerprint,
            identity.rank,
            config.settings,
            keys=keys,
            host=config.settings.listen_host,
            port=config.port_for_rank(identity.rank),
            output_prefix=config.output_prefix,
            device=device,
            layout=layout,
        )
        server.admission = warm_up.refusal
        server.start()
    except Exception as exc:
        log.error("rank %d: weight server did not start: %s", identity.rank, exc)
        return None
    with _lock:
        old = _servers.pop(identity.rank, None)
        _servers[identity.rank] = server
    if old is not None:
        old.stop()
    log.info("rank %d: %s on %s", identity.rank, what, server.endpoint)
    if keys is None:
        port = split_host_port(server.endpoint)[1]
        log.warning(
            "rank %d: serving weights without authentication on %s: anyone who can reach it "
            "can read the weights; set secret_file (a file made with `mesh keygen PATH`, the "
            "same on every instance) to require the cluster secret",
            identity.rank,
            join_host_port(config.settings.listen_host, port),
        )
    return server


def server_for_rank(rank: int):
    """The weight server this process runs for `rank`, if any."""
    with _lock:
        return _servers.get(rank)


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
            log.warning("weight server stop failed: %s", exc)


on_process_exit(stop_all)
