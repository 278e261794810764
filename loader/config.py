"""Parse and validate `--model-loader-extra-config` for the netloader load format.

Netloader-compatible upper-case keys (SOURCE, MODEL, LISTEN_PORT, CONFIG_FILE,
OUTPUT_PREFIX), the `mesh` object, and lower-case transfer tuning keys.
Every problem raises ValueError whose message starts with the offending key.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from mesh.addresses import parse_seed_list, split_host_port, valid_host

ENV_MESH_SEEDS = "NETLOADER_MESH_SEEDS"
MAX_STREAMS = 8  # connections per Gloo transfer (process_group.fence_gloo closes each)
ENV_MESH_SECRET_FILE = "NETLOADER_MESH_SECRET_FILE"


@dataclass(frozen=True)
class TransferSettings:
    """Tuning knobs shared by the weight server and the client."""

    connect_timeout_s: float = 5.0
    handshake_timeout_s: float = 10.0
    pg_setup_timeout_s: float = 30.0
    bucket_timeout_s: float = 60.0
    # a transfer's source that answers no ping for this long is presumed dead, and a
    # source ends the session of a client that stopped pinging 4 times as long
    # (loader.transfer.liveness): a crashed host sends no FIN, and no RST
    ping_interval_s: float = 0.25
    silence_timeout_s: float = 2.0
    # a relay whose upstream failed holds its downstream sessions this long for the next
    # upstream to resume the same transfer (loader.distribution.relay)
    relay_failover_s: float = 10.0
    bucket_mb: int = 64
    # TCP connections a Gloo transfer spreads its buckets over (the source decides; NCCL
    # and HCCL pick their own channels): one connection's kernel copy is a core's work
    streams: int = 2
    max_concurrent_clients: int = 4
    progress_interval_s: float = 5.0
    listen_host: str = "0.0.0.0"
    advertise_host: str | None = None
    secret_file: str | None = None
    max_message_mb: int = 64
    # compile artifacts (vLLM's torch.compile cache entry) move from the peer too
    compile_cache: bool = True
    compile_cache_max_mb: int = 1024
    compile_cache_timeout_s: float = 30.0

    @property
    def bucket_bytes(self) -> int:
        return self.bucket_mb << 20

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb << 20


@dataclass(frozen=True)
class SourceEntry:
    device_id: int
    sources: tuple[str, ...]


@dataclass(frozen=True)
class MeshConfig:
    seeds: tuple[str, ...] = ()
    bind: str | None = None
    secret_file: str | None = None
    zone: str | None = None
    wait_timeout_s: float = 10.0
    # how long a rank keeps re-attaching to mesh upstreams (busy ones, failed hops)
    attach_timeout_s: float = 300.0
    name: str | None = None
    # a mesh without a cluster secret starts only when this says so explicitly
    insecure: bool = False


@dataclass(frozen=True)
class NetloaderConfig:
    source: tuple[SourceEntry, ...] = ()
    model: str | None = None
    listen_port: int | None = None
    config_file: str | None = None
    output_prefix: str | None = None
    mesh: MeshConfig | None = None
    settings: TransferSettings = field(default_factory=TransferSettings)

    def sources_for_rank(self, rank: int) -> list[str]:
        """Static sources for this rank, in the order given (duplicates dropped)."""
        seen: list[str] = []
        for entry in self.source:
            if entry.device_id == rank:
                for addr in entry.sources:
                    if addr not in seen:
                        seen.append(addr)
        return seen

    def port_for_rank(self, rank: int) -> int:
        """LISTEN_PORT + rank, or 0 (pick a free port) when LISTEN_PORT is unset."""
        if self.listen_port is None:
            return 0
        port = self.listen_port + rank
        if port > 65535:
            raise ValueError(f"LISTEN_PORT: {self.listen_port} + rank {rank} exceeds 65535")
        return port

    @property
    def serves(self) -> bool:
        """Whether ranks serve their weights: only when a key asks for it (LISTEN_PORT,
        SOURCE, mesh, or OUTPUT_PREFIX, which publishes the served endpoint)."""
        return (
            self.listen_port is not None
            or bool(self.source)
            or self.mesh is not None
            or self.output_prefix is not None
        )

    @property
    def secret_file(self) -> str | None:
        """Secret for authenticating transfers: tuning key, else mesh.secret_file (incl. env)."""
        if self.settings.secret_file:
            return self.settings.secret_file
        return self.mesh.secret_file if self.mesh else os.environ.get(ENV_MESH_SECRET_FILE) or None


def parse_extra_config(raw: dict | str | None, environ: dict | None = None) -> NetloaderConfig:
    """Validate the extra-config JSON object (a dict, a JSON string, or None)."""
    env = os.environ if environ is None else environ
    obj = _as_object(raw)
    config_file = obj.get("CONFIG_FILE")
    if config_file is not None:
        file_obj = _read_config_file(_require_str("CONFIG_FILE", config_file))
        obj = {**obj, **file_obj}
    unknown = sorted(set(obj) - _TOP_LEVEL_KEYS)
    if unknown:
        raise ValueError(
            f"{unknown[0]}: unknown key (allowed: {', '.join(sorted(_TOP_LEVEL_KEYS))})"
        )
    config = NetloaderConfig(
        source=_parse_source(obj.get("SOURCE")),
        model=_optional(obj, "MODEL", _require_str),
        listen_port=_optional(obj, "LISTEN_PORT", lambda k, v: _require_int(k, v, 1024, 65535)),
        config_file=config_file,
        output_prefix=_optional(obj, "OUTPUT_PREFIX", _require_str),
        mesh=_parse_mesh(obj.get("mesh"), env),
        settings=_parse_settings(obj),
    )
    _check_mesh_secret(config)
    return config


def _check_mesh_secret(config: NetloaderConfig) -> None:
    """Fail closed: a mesh runs with a cluster secret, or with an explicit `insecure`."""
    mesh = config.mesh
    if mesh is None or mesh.insecure or mesh.secret_file or config.settings.secret_file:
        return
    raise ValueError(
        "mesh.secret_file: not set, and a mesh without a cluster secret lets anyone who can "
        "reach it join, read and advertise. Make a secret with `mesh keygen /path/to/secret` "
        f"and point mesh.secret_file (or {ENV_MESH_SECRET_FILE}) at it on every instance; "
        'to run an unauthenticated mesh anyway, set "insecure": true in the mesh object'
    )


def _as_object(raw: Any) -> dict:
    if raw is None:
        return {}
    if isinstance(raw, (str, bytes)):
        text = raw.decode() if isinstance(raw, bytes) else raw
        if not text.strip():
            return {}
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"model-loader-extra-config: not valid JSON ({exc.msg} at position {exc.pos}); "
                "pass a JSON object with double-quoted keys"
            ) from None
    if not isinstance(raw, dict):
        raise ValueError(
            f"model-loader-extra-config: expected a JSON object, got {type(raw).__name__}"
        )
    return raw


def _read_config_file(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            obj = json.load(fh)
    except OSError as exc:
        raise ValueError(f"CONFIG_FILE: cannot read {path!r}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"CONFIG_FILE: {path!r} is not valid JSON ({exc.msg})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"CONFIG_FILE: {path!r} must hold a JSON object")
    if "CONFIG_FILE" in obj:
        raise ValueError(f"CONFIG_FILE: {path!r} must not itself set CONFIG_FILE")
    return obj


def _optional(obj: dict, key: str, check):
    value = obj.get(key)
    return None if value is None else check(key, value)


def _require_str(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{key}: expected a non-empty string, got {value!r}")
    return value


def _require_int(key: str, value: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key}: expected an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        bound = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"{key}: {value} out of range ({bound})")
    return value


def _require_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{key}: expected true or false, got {value!r}")
    return value


def _require_seconds(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key}: expected a number of seconds, got {value!r}")
    if not 0 < value <= 86400:
        raise ValueError(f"{key}: {value} out of range (0 < seconds <= 86400)")
    return float(value)


def _require_host(key: str, value: Any) -> str:
    if not valid_host(value):
        raise ValueError(f"{key}: expected a host name or IP address, got {value!r}")
    return value


def parse_host_port(key: str, value: Any, allow_port_zero: bool = False) -> tuple[str, int]:
    """Split "host:port" (IPv6 as "[::1]:port"); ValueError naming key on bad input."""
    try:
        return split_host_port(value, min_port=0 if allow_port_zero else 1)
    except ValueError as exc:
        raise ValueError(f"{key}: {exc}") from None


def _parse_source(value: Any) -> tuple[SourceEntry, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ValueError(f"SOURCE: expected a list of {{device_id, sources}}, got {value!r}")
    entries = []
    for i, item in enumerate(value):
        where = f"SOURCE[{i}]"
        if not isinstance(item, dict):
            raise ValueError(f"{where}: expected an object, got {item!r}")
        extra = sorted(set(item) - {"device_id", "sources"})
        if extra:
            raise ValueError(f"{where}.{extra[0]}: unknown key")
        if "device_id" not in item:
            raise ValueError(f"{where}.device_id: missing")
        if "sources" not in item:
            raise ValueError(f"{where}.sources: missing")
        device_id = _require_int(f"{where}.device_id", item["device_id"], 0)
        sources = item["sources"]
        if not isinstance(sources, list):
            raise ValueError(f'{where}.sources: expected a list of "host:port", got {sources!r}')
        for j, addr in enumerate(sources):
            parse_host_port(f"{where}.sources[{j}]", addr)
        entries.append(SourceEntry(device_id, tuple(sources)))
    return tuple(entries)


def _parse_mesh(value: Any, env) -> MeshConfig | None:
    env_seeds = parse_seed_list(env.get(ENV_MESH_SEEDS))
    env_secret = env.get(ENV_MESH_SECRET_FILE) or None
    if value is None:
        if not env_seeds:
            return None
        value = {}
    if not isinstance(value, dict):
        raise ValueError(f"mesh: expected an object, got {value!r}")
    extra = sorted(set(value) - _MESH_KEYS)
    if extra:
        raise ValueError(f"mesh.{extra[0]}: unknown key (allowed: {', '.join(sorted(_MESH_KEYS))})")
    seeds = value.get("seeds")
    if seeds is None:
        seeds, seeds_key = env_seeds, ENV_MESH_SEEDS
    else:
        seeds_key = "mesh.seeds"
        if not isinstance(seeds, list):
            raise ValueError(f'mesh.seeds: expected a list of "host:port", got {seeds!r}')
    for j, addr in enumerate(seeds):
        parse_host_port(f"{seeds_key}[{j}]", addr)
    bind = value.get("bind")
    if bind is not None:
        parse_host_port("mesh.bind", bind, allow_port_zero=True)

    def mesh_key(key: str, check):
        return _optional(value, key, lambda k, v: check("mesh." + k, v))

    return MeshConfig(
        seeds=tuple(seeds),
        bind=bind,
        secret_file=mesh_key("secret_file", _require_str) or env_secret,
        zone=mesh_key("zone", _require_str),
        wait_timeout_s=mesh_key("wait_timeout_s", _require_seconds) or MeshConfig.wait_timeout_s,
        attach_timeout_s=mesh_key("attach_timeout_s", _require_seconds)
        or MeshConfig.attach_timeout_s,
        name=mesh_key("name", _require_str),
        insecure=mesh_key("insecure", _require_bool) or False,
    )


def _parse_settings(obj: dict) -> TransferSettings:
    values: dict[str, Any] = {}
    for f in dataclasses.fields(TransferSettings):
        if f.name not in obj or obj[f.name] is None:
            continue
        key, value = f.name, obj[f.name]
        if key.endswith("_s"):
            values[key] = _require_seconds(key, value)
        elif key == "bucket_mb":
            values[key] = _require_int(key, value, 1, 4096)
        elif key == "streams":
            values[key] = _require_int(key, value, 1, MAX_STREAMS)
        elif key == "max_concurrent_clients":
            values[key] = _require_int(key, value, 1, 1024)
        elif key == "max_message_mb":
            values[key] = _require_int(key, value, 1, 1024)
        elif key == "compile_cache_max_mb":
            values[key] = _require_int(key, value, 1, 1 << 16)
        elif key == "compile_cache":
            values[key] = _require_bool(key, value)
        elif key in ("listen_host", "advertise_host"):
            values[key] = _require_host(key, value)
        else:
            values[key] = _require_str(key, value)
    settings = TransferSettings(**values)
    if 2 * settings.ping_interval_s > settings.silence_timeout_s:
        raise ValueError(
            f"ping_interval_s: {settings.ping_interval_s:g} must be at most half of "
            f"silence_timeout_s ({settings.silence_timeout_s:g}), or every source is presumed dead"
        )
    return settings


_SETTINGS_KEYS = {f.name for f in dataclasses.fields(TransferSettings)}
_TOP_LEVEL_KEYS = {
    "SOURCE",
    "MODEL",
    "LISTEN_PORT",
    "CONFIG_FILE",
    "OUTPUT_PREFIX",
    "mesh",
} | _SETTINGS_KEYS
_MESH_KEYS = {f.name for f in dataclasses.fields(MeshConfig)}
