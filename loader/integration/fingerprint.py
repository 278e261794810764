"""Fingerprint: a sha256 over everything that makes two ranks' weights interchangeable.

Covered: config.json (canonical JSON), the content identity of the weights, dtype,
quantization, tp, pp, rank and the vLLM version. The content id (`compute_content_id`)
covers the same without tp, pp and rank: what ranks of different shapes share.

Content identity of the weights:
- a user-given model id (Netloader's MODEL), when given — it is a *declared* identity,
  so a client that holds only config + tokenizer can match a source that gives the same
  id; both sides must pass the same value;
- otherwise the content ids of the weight files in model_dir: the hub blob sha256 when a
  file resolves into a hub cache `blobs/<sha256>` (LFS files are named by their sha256),
  else a sha256 of the file computed once and cached on disk by (path, size, mtime).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from pathlib import Path

import orjson

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_CACHE_LOCK = threading.Lock()


def default_cache_dir() -> Path:
    base = os.environ.get("NETLOADER_CACHE_DIR")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg) / "netloader" if xdg else Path.home() / ".cache" / "netloader"


def compute_fingerprint(
    model_dir: str | os.PathLike | None,
    model_id: str | None,
    dtype: str,
    quantization: str | None,
    tp: int,
    pp: int,
    rank: int,
    vllm_version: str,
    cache_dir: str | os.PathLike | None = None,
) -> str:
    """Return a hex sha256; ValueError when no content identity can be established."""
    identity = _weights_identity(model_dir, model_id, dtype, quantization, vllm_version, cache_dir)
    identity.update({"tp": int(tp), "pp": int(pp), "rank": int(rank)})
    return hashlib.sha256(orjson.dumps(identity, option=orjson.OPT_SORT_KEYS)).hexdigest()


def compute_content_id(
    model_dir: str | os.PathLike | None,
    model_id: str | None,
    dtype: str,
    quantization: str | None,
    vllm_version: str,
    cache_dir: str | os.PathLike | None = None,
) -> str:
    """The fingerprint without the shape (TP, PP, rank): equal on every rank of every
    instance that serves these weights, whatever its parallelism (resharding matches
    on it). ValueError as compute_fingerprint."""
    identity = _weights_identity(model_dir, model_id, dtype, quantization, vllm_version, cache_dir)
    identity["layout"] = "any"  # never equal to a fingerprint
    return hashlib.sha256(orjson.dumps(identity, option=orjson.OPT_SORT_KEYS)).hexdigest()


def _weights_identity(model_dir, model_id, dtype, quantization, vllm_version, cache_dir) -> dict:
    config = _config_identity(model_dir)
    if model_id:
        content = {"model_id": model_id}
    else:
        files = weight_files(model_dir) if model_dir else []
        if not files:
            raise ValueError(
                f"MODEL: no weight files in {model_dir!r} and no MODEL id given; "
                "cannot identify the weights to fetch"
            )
        cache = Path(cache_dir) if cache_dir else default_cache_dir()
        content = {"files": {p.name: weight_file_content_id(p, cache) for p in files}}
    return {
        "config": config,
        "content": content,
        "dtype": str(dtype).removeprefix("torch."),
        "quantization": quantization,
        "vllm": vllm_version,
    }


def weight_files(model_dir: str | os.PathLike) -> list[Path]:
    root = Path(model_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.endswith(WEIGHT_SUFFIXES) and p.is_file())


def weight_file_content_id(path: Path, cache_dir: Path) -> str:
    real = Path(os.path.realpath(path))
    if real.parent.name == "blobs" and _SHA256_RE.match(real.name):
        return real.name
    return _cached_file_digest(real, cache_dir)


def _config_identity(model_dir) -> str | None:
    if not model_dir:
        return None
    path = Path(model_dir) / "config.json"
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    try:
        canonical = orjson.dumps(json.loads(raw), option=orjson.OPT_SORT_KEYS)
    except ValueError:
        canonical = raw
    return hashlib.sha256(canonical).hexdigest()


def _cached_file_digest(real: Path, cache_dir: Path) -> str:
    st = real.stat()
    key = f"{real}|{st.st_size}|{st.st_mtime_ns}"
    cache_file = cache_dir / "file-digests.json"
    with _CACHE_LOCK:
        cache = _read_cache(cache_file)
        if key in cache:
            return cache[key]
    digest = _sha256_file(real)
    with _CACHE_LOCK:
        cache = _read_cache(cache_file)
        cache[key] = digest
        _write_cache(cache_file, cache)
    return digest


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def _read_cache(cache_file: Path) -> dict[str, str]:
    try:
        data = orjson.loads(cache_file.read_bytes())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, str) and _SHA256_RE.match(v)}


def _write_cache(cache_file: Path, cache: dict[str, str]) -> None:
    # best effort: an unwritable cache only costs recomputation next time
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(orjson.dumps(cache))
        os.replace(tmp, cache_file)
    except OSError:
        pass
