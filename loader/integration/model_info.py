"""vLLM's model-class inspection results from a peer, before vLLM inspects.

Before anything else, vLLM's API server inspects the model class (which interfaces it
implements) in a fresh Python subprocess, unless its cache root holds the result of an
earlier start: one small JSON object per class under `VLLM_CACHE_ROOT/modelinfos/`,
keyed by a hash of the class's source file (vLLM checks the hash itself and inspects
again when it differs). On a cold start that subprocess is one of the largest costs after
compilation. The loader runs much later, in the workers, so the plugin does this in the
API server: with `--load-format netloader`, it asks a peer that offers a compile cache for
its files and writes those missing here. Only with a cluster secret; at most
MODEL_INFO_TIMEOUT_S; on any failure vLLM inspects as usual.
"""

from __future__ import annotations

import logging
import os
import time

import orjson

from loader.config import NetloaderConfig, parse_extra_config
from loader.distribution.peer_record import PeerRecord
from loader.integration import vllm_compat

log = logging.getLogger(__name__)

MODEL_INFO_TIMEOUT_S = 3.0
_DIR = "modelinfos"
_MAX_FILE_BYTES = 1 << 16


def model_info_dir() -> str:
    root = vllm_compat.vllm_env("VLLM_CACHE_ROOT", os.path.expanduser("~/.cache/vllm"))
    return os.path.join(str(root), _DIR)


def read_model_infos(directory: str | None = None) -> dict[str, dict]:
    """This cache root's inspection results, by file name (what a source offers)."""
    directory = directory or model_info_dir()
    found = {}
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return found
    for name in names:
        path = os.path.join(directory, name)
        try:
            if name.endswith(".json") and os.path.getsize(path) <= _MAX_FILE_BYTES:
                with open(path, "rb") as fh:
                    found[name] = orjson.loads(fh.read())
        except (OSError, orjson.JSONDecodeError):
            continue
    return found


def prefetch(extra_config) -> None:
    """Fill this cache root's missing inspection results from a peer (API server side).
    Never raises: a bad config is reported by the loader itself, in the engine."""
    try:
        config = parse_extra_config(extra_config)
    except ValueError:
        return
    if not config.settings.compile_cache:
        return
    from loader.integration.serving import cluster_keys

    try:
        keys = cluster_keys(config)
    except ValueError:
        return
    if keys is None:
        return
    from loader.transfer.cache_client import fetch_model_infos

    started = time.monotonic()
    deadline = started + MODEL_INFO_TIMEOUT_S
    failures = []
    sources = _sources(config, keys, failures)
    for source in sources:
        fetched = fetch_model_infos(source, config.settings, keys, deadline)
        if fetched.failure is None:
            written = install(model_info_dir(), fetched.model_infos)
            log.info("netloader: %d of %d model inspection results from %s in %.2fs",
                     written, len(fetched.model_infos), source, time.monotonic() - started)
            return
        failures.append(f"{source}: {fetched.failure}")
        if time.monotonic() >= deadline:
            break
    log.info("netloader: no model inspection results from peers in %.2fs (%s); vLLM "
             "inspects the model class itself", time.monotonic() - started,
             "; ".join(failures) or "no peer offers a compile cache")


def install(directory: str, files: dict[str, dict]) -> int:
    """Write the files this directory lacks (each atomically); how many were written."""
    os.makedirs(directory, exist_ok=True)
    written = 0
    for name, content in files.items():
        path = os.path.join(directory, name)
        if os.path.exists(path):
            continue
        tmp = f"{path}.{os.getpid()}.netloader-tmp"
        try:
            with open(tmp, "wb") as fh:
                fh.write(orjson.dumps(content))
            os.link(tmp, path)  # never replaces a file vLLM wrote meanwhile
            written += 1
        except OSError:
            pass
        finally:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return written


def _sources(config: NetloaderConfig, keys, failures: list[str]) -> list[str]:
    """Weight servers that offer a compile cache (mesh), then every static SOURCE."""
    sources: list[str] = []
    if config.mesh is not None and config.mesh.seeds:
        from mesh.status import StatusError, query_members

        try:
            _, rows = query_members(list(config.mesh.seeds), keys, timeout_s=1.5)
        except StatusError as exc:
            failures.append(f"mesh: {exc}")
            rows = []
        for row in rows:
            record = PeerRecord.from_meta(row.get("meta") or {})
            if row.get("state") == "alive" and record and record.endpoint and record.compile_key:
                sources.append(record.endpoint)
    sources += [addr for entry in config.source for addr in entry.sources]
    return list(dict.fromkeys(sources))[:4]
