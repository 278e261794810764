"""Compile artifacts from the peer: vLLM's torch.compile cache entry for this rank.

vLLM compiles after the loader has run (warm-up), into a directory under
`VLLM_CACHE_ROOT/torch_compile_cache/` named by a hash of what the compilation depends
on (vLLM's config hash, its compile-relevant environment, the traced code). An entry
holds vLLM's artifact per rank and the inductor cache (compiled kernels; on GPU the
Triton kernels inside it). A rank that compiled offers its entry next to its weights;
a starting rank with the same compile key fetches it before vLLM compiles, so vLLM finds
it as if it had compiled before.

The compile key hashes the factors both sides can compute before compiling: vLLM and
torch versions, vLLM's config hash (model, parallelism, scheduler, compilation config...),
vLLM's compile-relevant environment, the device (CPU ISA flags, GPU/NPU model) and the
rank. A peer with another key is refused, naming the first differing factor.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import orjson
import torch

from loader.config import TransferSettings
from loader.integration import vllm_compat
from loader.integration.model_info import read_model_infos
from loader.transfer.cache_client import fetch_cache
from loader.transfer.cache_files import CacheTooLarge, list_entry
from loader.transfer.cache_source import ServedCache
from loader.transfer.cache_wire import CACHE_DIR, CacheOffer
from loader.transfer.checksum import checksum_key

if TYPE_CHECKING:
    from loader.integration.vllm_compat import VllmConfig

log = logging.getLogger(__name__)

PEER, LOCAL = "peer", "local"
_AOT_DIR = "torch_aot_compile"
_INDEX_DIR = os.path.join("netloader", "compile_index")
REFRESH_S = 5.0  # how often a source looks whether vLLM added to its entry


@dataclass(frozen=True)
class CompileIdentity:
    key: str
    factors: dict[str, str]
    root: str  # vLLM's cache root
    rank_dir: str  # vLLM's per-rank directory name inside an entry


def compile_identity(vllm_config: VllmConfig) -> CompileIdentity | str:
    """This rank's compile key, or why it has no compile cache to exchange."""
    missing = vllm_compat.compile_cache_surface()
    if missing:
        return missing
    compilation = vllm_config.compilation_config
    if getattr(vllm_config.model_config, "enforce_eager", False) or int(compilation.mode or 0) == 0:
        return "compilation is off (enforce_eager or compilation mode NONE)"
    if vllm_compat.vllm_env("VLLM_DISABLE_COMPILE_CACHE", False):
        return "vLLM's compile cache is disabled (VLLM_DISABLE_COMPILE_CACHE)"
    parallel = vllm_config.parallel_config
    dp_rank = getattr(parallel, "data_parallel_index", getattr(parallel, "data_parallel_rank", 0))
    rank_dir = f"rank_{parallel.rank}_{dp_rank}"
    factors = {
        "vllm": vllm_compat.VLLM_VERSION,
        "torch": torch.__version__,
        "config_hash": vllm_config.compute_hash(),
        "env_hash": _digest(vllm_compat.compile_factors())[:20],
        "device": device_factor(torch.device(str(vllm_config.device_config.device))),
        "rank": rank_dir,
    }
    root = str(vllm_compat.vllm_env("VLLM_CACHE_ROOT", os.path.expanduser("~/.cache/vllm")))
    return CompileIdentity(_digest(factors)[:32], factors, root, rank_dir)


def device_factor(device: torch.device) -> str:
    """What compiled code depends on: the CPU's instruction set, or the accelerator's model."""
    if device.type == "cpu":
        return f"cpu {platform.machine()} flags {_cpu_flags_digest()}"
    module = getattr(torch, device.type, None)
    name = module.get_device_name(device) if hasattr(module, "get_device_name") else "?"
    capability = ""
    if hasattr(module, "get_device_capability"):
        major, minor = module.get_device_capability(device)
        capability = f" sm{major}{minor}"
    return f"{device.type} {name}{capability}"


def obtain(identity: CompileIdentity, sources: list[str], settings: TransferSettings, keys) -> str:
    """The result line's `compile_cache`: "local" when this root already has the entry,
    "peer" once one of `sources` gave a verified entry, else "none: <reasons>"."""
    if _indexed_locally(identity):
        return LOCAL
    if not sources:
        return "none: no peer offers this compile key"
    deadline = time.monotonic() + settings.compile_cache_timeout_s
    failures = []
    for source in sources:
        fetched = fetch_cache(source, identity.key, identity.factors, identity.root, settings,
                              keys, deadline)
        if fetched.failure is None:
            report = fetched.report
            log.info(
                "compile cache: %d files (%.1f MiB) from %s, %d new, %d already here",
                report.installed + report.kept, fetched.bytes / (1 << 20), source,
                report.installed, report.kept,
            )
            return PEER if report.installed else LOCAL
        log.info("compile cache from %s not used: %s", source, fetched.failure)
        failures.append(f"{source}: {fetched.failure}")
        if time.monotonic() >= deadline:
            break
    return "none: " + "; ".join(failures)[:500]


def offer_when_compiled(
    vllm_config: VllmConfig, identity: CompileIdentity, settings: TransferSettings, keys,
    server_of_rank, stop: threading.Event | None = None,
) -> threading.Thread:
    """After vLLM's warm-up: list the entry it compiled into (or used), record it in the
    local index, and offer it through this rank's server (`server_of_rank()`, read each
    time, as serving may replace it). Runs on a thread of its own, so hashing a large
    entry never delays readiness, and lists the entry again whenever it changed (vLLM
    compiles more on the first requests, e.g. the sampler): a later peer gets that too."""
    stop = stop or threading.Event()

    def keep_current() -> None:
        entries, skip = _entries_used(vllm_config, identity)
        if not entries:
            log.info("compile cache: vLLM used no cache entry under %s; nothing to offer",
                     identity.root)
            return
        _write_index(identity, entries)
        listed = None
        while True:
            signature = _signature(identity.root, entries)
            if signature != listed:
                listed = signature
                _offer(identity, entries, skip, settings, keys, server_of_rank())
            if stop.wait(REFRESH_S):
                return

    thread = threading.Thread(target=keep_current, name="netloader-compile-cache", daemon=True)
    thread.start()
    return thread


def _offer(identity, entries, skip, settings: TransferSettings, keys, server) -> None:
    try:
        files = list_entry(identity.root, entries, skip, checksum_key(keys),
                           settings.compile_cache_max_mb << 20)
    except (CacheTooLarge, OSError) as exc:
        log.warning("compile cache not offered: %s", exc)
        return
    offered = server is not None and keys is not None
    if offered:
        server.compile_cache = ServedCache(
            identity.root, CacheOffer(identity.key, identity.factors, tuple(entries), files),
            read_model_infos(),
        )
    log.info(
        "compile cache: %s (%d files, %.1f MiB)%s", ", ".join(entries), len(files),
        sum(f.size for f in files) / (1 << 20),
        " offered to peers" if offered else " not offered (no weight server or no cluster secret)",
    )


def _signature(root: str, entries: list[str]) -> list[tuple[str, int, int]]:
    """(path, size, mtime) of every file of the entries: changes when vLLM adds to them."""
    found = []
    for entry in entries:
        for dirpath, _, names in os.walk(os.path.join(root, entry)):
            for name in names:
                try:
                    st = os.stat(os.path.join(dirpath, name))
                except OSError:
                    continue
                found.append((os.path.join(dirpath, name), st.st_size, st.st_mtime_ns))
    return sorted(found)


def _entries_used(vllm_config: VllmConfig, identity: CompileIdentity) -> tuple[list[str], set[str]]:
    """The entry directories (relative to the root) vLLM's compilation used, and the
    other ranks' directories inside them (not this rank's to offer)."""
    compilation = vllm_config.compilation_config
    base = os.path.join(identity.root, CACHE_DIR)
    entries: list[str] = []
    for used in (getattr(compilation, "cache_dir", ""), getattr(compilation, "local_cache_dir", "")):
        if not used:
            continue
        rel = os.path.relpath(os.path.realpath(used), os.path.realpath(base)).split(os.sep)
        if rel[0] in ("..", "."):
            continue  # outside the cache root (a user-given cache_dir)
        entry = "/".join([CACHE_DIR, *rel[: 2 if rel[0] == _AOT_DIR else 1]])
        if entry not in entries and os.path.isdir(os.path.join(identity.root, entry)):
            entries.append(entry)
    skip = set()
    for entry in entries:
        for name in os.listdir(os.path.join(identity.root, entry)):
            if name.startswith("rank_") and name != identity.rank_dir:
                skip.add(f"{entry}/{name}")
    return entries, skip


def _index_path(identity: CompileIdentity) -> str:
    return os.path.join(identity.root, _INDEX_DIR, f"{identity.key}.json")


def _indexed_locally(identity: CompileIdentity) -> bool:
    """This root holds the entry a compilation with this key used before."""
    try:
        with open(_index_path(identity), "rb") as fh:
            entries = orjson.loads(fh.read())["entries"]
        return bool(entries) and all(
            isinstance(e, str) and os.path.isdir(os.path.join(identity.root, e)) for e in entries
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _write_index(identity: CompileIdentity, entries: list[str]) -> None:
    path = _index_path(identity)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(orjson.dumps({"entries": entries, "factors": identity.factors}))
        os.replace(tmp, path)
    except OSError as exc:
        log.debug("compile cache index not written: %s", exc)


def _digest(obj) -> str:
    return hashlib.sha256(orjson.dumps(obj, option=orjson.OPT_SORT_KEYS, default=str)).hexdigest()


def _cpu_flags_digest() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    flags = sorted(line.split(":", 1)[1].split())
                    return hashlib.sha256(" ".join(flags).encode()).hexdigest()[:12]
    except OSError:
        pass
    return platform.processor() or "unknown"
