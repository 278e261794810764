"""Control messages that move a compile cache entry (orjson over the same authenticated
ZeroMQ control channel as the weights).

client -> server: cache_get (the client's compile key), cache_read (a byte range of one
                  listed file), modelinfo_get
server -> client: cache_offer (the server's key and factors; when the keys match, the
                  listing: relative path, size and keyed checksum of every file), nack,
                  cache_data (the range asked for, as a second, binary frame),
                  modelinfo (vLLM's model-class inspection results, one small JSON
                  object per class, by file name)

Every decoded message is untrusted: size, type and every field are checked here. Paths
are validated before anything touches the file system (relative, normalized, no `..`,
a safe character set, under `torch_compile_cache/`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from loader.transfer.protocol import ProtocolError, expect_fields, int_field, match_field

CACHE_VERSION = 1
CHUNK_BYTES = 4 << 20  # largest range a client asks for at once
MAX_FILES = 20_000
MAX_ENTRIES = 16
MAX_FILE_BYTES = 1 << 34
MAX_PATH_LEN = 400
MAX_FACTORS = 32
MAX_FACTOR_LEN = 200
CACHE_DIR = "torch_compile_cache"

_KEY_RE = re.compile(r"^[0-9a-f]{16,64}$")
_DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
_DIGEST_ANY_RE = re.compile(r"^[0-9a-f]{16,128}$")
_PART_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}$")
_FACTOR_NAME_RE = re.compile(r"^[a-z_]{1,32}$")


@dataclass(frozen=True)
class CacheFile:
    path: str  # relative to the cache root, "/"-separated, validated
    size: int
    digest: str  # keyed BLAKE3 (loader.transfer.checksum key) of the file's bytes


@dataclass(frozen=True)
class CacheOffer:
    key: str
    factors: dict[str, str]
    entries: tuple[str, ...] = ()  # the entry directories; every file lies under one
    files: tuple[CacheFile, ...] = ()  # both empty when the keys differ

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def get_message(key: str) -> dict:
    return {"type": "cache_get", "v": CACHE_VERSION, "key": key}


def parse_get(obj: dict) -> str:
    """The requested key of a cache_get."""
    expect_fields(obj, "cache_get", {"v", "key"})
    if obj["v"] != CACHE_VERSION:
        raise ProtocolError(f"unsupported compile cache version {obj['v']!r}")
    return match_field("key", obj["key"], _KEY_RE)


def offer_message(offer: CacheOffer) -> dict:
    return {
        "type": "cache_offer",
        "key": offer.key,
        "factors": dict(offer.factors),
        "entries": list(offer.entries),
        "files": [[f.path, f.size, f.digest] for f in offer.files],
    }


def parse_offer(obj: dict, max_total_bytes: int) -> CacheOffer:
    expect_fields(obj, "cache_offer", {"key", "factors", "entries", "files"})
    entries = obj["entries"]
    if not isinstance(entries, list) or len(entries) > MAX_ENTRIES:
        raise ProtocolError(f"entries: expected a list of at most {MAX_ENTRIES} directories")
    entries = tuple(check_path(e, min_parts=2) for e in entries)
    files = obj["files"]
    if not isinstance(files, list) or len(files) > MAX_FILES:
        raise ProtocolError(f"files: expected a list of at most {MAX_FILES} entries")
    listing = []
    seen: set[str] = set()
    for entry in files:
        if not isinstance(entry, list) or len(entry) != 3:
            raise ProtocolError("files: expected [path, size, digest] entries")
        path = check_path(entry[0])
        if not any(path.startswith(e + "/") for e in entries):
            raise ProtocolError(f"files: {path} lies under no listed entry")
        if path in seen:
            raise ProtocolError(f"files: {path} listed twice")
        seen.add(path)
        listing.append(
            CacheFile(path, int_field("files[].size", entry[1], 0, MAX_FILE_BYTES),
                      match_field("files[].digest", entry[2], _DIGEST_RE))
        )
    offer = CacheOffer(match_field("key", obj["key"], _KEY_RE), parse_factors(obj["factors"]),
                       entries, tuple(listing))
    if offer.total_bytes > max_total_bytes:
        raise ProtocolError(
            f"files: {offer.total_bytes} bytes in all, above the limit of {max_total_bytes}"
        )
    return offer


def parse_factors(value) -> dict[str, str]:
    if not isinstance(value, dict) or len(value) > MAX_FACTORS:
        raise ProtocolError(f"factors: expected an object of at most {MAX_FACTORS} entries")
    factors = {}
    for name, text in value.items():
        if not _FACTOR_NAME_RE.match(name) or not isinstance(text, str):
            raise ProtocolError("factors: malformed entry")
        factors[name] = "".join(c if c.isprintable() else "?" for c in text[:MAX_FACTOR_LEN])
    return factors


def read_message(key: str, index: int, offset: int, length: int) -> dict:
    return {"type": "cache_read", "key": key, "file": index, "offset": offset, "length": length}


@dataclass(frozen=True)
class ReadRequest:
    key: str
    index: int
    offset: int
    length: int


def parse_read(obj: dict) -> ReadRequest:
    expect_fields(obj, "cache_read", {"key", "file", "offset", "length"})
    return ReadRequest(
        match_field("key", obj["key"], _KEY_RE),
        int_field("file", obj["file"], 0, MAX_FILES - 1),
        int_field("offset", obj["offset"], 0, MAX_FILE_BYTES),
        int_field("length", obj["length"], 1, CHUNK_BYTES),
    )


def data_header(index: int, offset: int) -> dict:
    return {"type": "cache_data", "file": index, "offset": offset}


def parse_data_header(obj: dict) -> tuple[int, int]:
    expect_fields(obj, "cache_data", {"file", "offset"})
    return int_field("file", obj["file"], 0, MAX_FILES - 1), int_field("offset", obj["offset"], 0, MAX_FILE_BYTES)


def check_path(value, min_parts: int = 3) -> str:
    """A listed path, or ProtocolError: relative, "/"-separated, every part of a safe
    character set (never `.` or `..`, nothing hidden), at least `min_parts` deep under
    torch_compile_cache/ (an entry directory: 2, a file in one: 3)."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_PATH_LEN:
        raise ProtocolError("path: expected a non-empty string")
    parts = value.split("/")
    if len(parts) < min_parts or parts[0] != CACHE_DIR or not all(_PART_RE.match(p) for p in parts):
        raise ProtocolError(f"path: unsafe or outside {CACHE_DIR}/: {value[:80]!r}")
    return value


def first_difference(ours: dict[str, str], theirs: dict[str, str]) -> str | None:
    """The first factor that differs, as "name: ours vs theirs", or None."""
    for name in sorted(set(ours) | set(theirs)):
        a, b = ours.get(name, "-"), theirs.get(name, "-")
        if a != b:
            return f"{name} {a[:60]} here vs {b[:60]} on the peer"
    return None


MAX_MODEL_INFOS = 64
_MODEL_INFO_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}\.json$")
_SCALAR = (str, int, float, bool, type(None))


def model_info_get_message() -> dict:
    return {"type": "modelinfo_get"}


def model_info_message(files: dict[str, dict]) -> dict:
    return {"type": "modelinfo", "files": files}


def parse_model_info(obj: dict) -> dict[str, dict]:
    """{file name: {"hash": str, "modelinfo": {field: scalar or list of scalars}}}: the
    shape vLLM writes under VLLM_CACHE_ROOT/modelinfos (it checks the hash itself)."""
    expect_fields(obj, "modelinfo", {"files"})
    files = obj["files"]
    if not isinstance(files, dict) or len(files) > MAX_MODEL_INFOS:
        raise ProtocolError(f"files: expected an object of at most {MAX_MODEL_INFOS} entries")
    for name, info in files.items():
        if not _MODEL_INFO_NAME_RE.match(name):
            raise ProtocolError(f"files: unsafe name {name[:80]!r}")
        if not isinstance(info, dict) or set(info) != {"hash", "modelinfo"}:
            raise ProtocolError(f"files[{name}]: expected {{hash, modelinfo}}")
        match_field(f"files[{name}].hash", info["hash"], _DIGEST_ANY_RE)
        fields = info["modelinfo"]
        if not isinstance(fields, dict) or len(fields) > 64 or not all(
            isinstance(k, str) and len(k) <= 64 and _plain(v) for k, v in fields.items()
        ):
            raise ProtocolError(f"files[{name}].modelinfo: expected plain fields")
    return files


def _plain(value) -> bool:
    if isinstance(value, list):
        return len(value) <= 64 and all(isinstance(v, _SCALAR) for v in value)
    return isinstance(value, _SCALAR) and not (isinstance(value, str) and len(value) > 200)
