"""What a rank advertises in the gossip mesh, and who it is: the one schema of a peer's
mesh metadata.

The mesh carries metadata as an opaque dict; this module alone knows its keys. The wire
keys are fixed (mixed-version meshes and `mesh status --json` readers rely on them):

    role, model, fingerprint, tp, pp, rank, ready, vllm, zone, host    who it is
    endpoint, state, progress, load, capacity, upstream, retained_bytes its transfer status
    content                                                            what other shapes match
    compile_key                                                         the compile cache it offers

`from_meta` reads metadata that came from the network: anything malformed makes the whole
record unreadable (None) rather than half-trusted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any

from loader.transfer.serving_strategy import TransferState


@dataclass(frozen=True)
class RankIdentity:
    """Who this worker is, as far as weight exchange cares: rank, shape and fingerprint
    (computed from vLLM by loader.integration.identity)."""

    rank: int
    tp: int
    pp: int
    device: str
    fingerprint: str | None
    fingerprint_error: str | None = None
    content: str | None = None  # the fingerprint without tp, pp, rank (resharding)


@dataclass(frozen=True)
class PeerRecord:
    fingerprint: str
    tp: int
    pp: int
    rank: int
    ready: bool = False  # a source of every weight (state complete, or an older peer)
    role: str | None = None
    model: str | None = None
    vllm: str | None = None
    zone: str | None = None
    host: str | None = None  # a same-host hint for members whose addresses differ
    endpoint: str | None = None
    state: TransferState | None = None  # None: a peer that does not gossip its transfer
    progress: float | None = None  # verified fraction, 0..1
    load: int | None = None  # transfers it serves right now
    capacity: int | None = None  # transfers it serves at once
    upstream: str | None = None  # the endpoint it receives from
    retained_bytes: int | None = None  # bytes kept only to serve (raw copies)
    content: str | None = None  # layout-independent content id: other shapes reshard from it
    compile_key: str | None = None  # the compile cache entry it offers (integration.compile_cache)

    def to_meta(self) -> dict[str, Any]:
        """The gossip metadata: every field that is set, under its wire key."""
        meta: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                meta[f.name] = value.value if isinstance(value, Enum) else value
        return meta

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> PeerRecord | None:
        """The record in a member's metadata; None if it has none or any value is malformed.
        Never raises. Records are remembered by content (values with their types: 1 and
        True are equal, but only one is a count): every read of the gossip table parses
        every member's metadata, which changes only a few times per transfer."""
        try:
            values = [meta.get(name) for name in _FIELD_NAMES]
            key = tuple((type(v), v) for v in values)
            cached = _PARSED.get(key, _MISSING)
        except (TypeError, AttributeError):
            return None  # not a mapping, or unhashable values: malformed
        if cached is not _MISSING:
            return cached
        try:
            record = cls(**{n: _READERS[n](v) for n, v in zip(_FIELD_NAMES, values, strict=True)})
        except (TypeError, ValueError, AttributeError):
            record = None
        if len(_PARSED) >= _PARSED_MAX:
            _PARSED.clear()
        _PARSED[key] = record
        return record


def _text(value) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise ValueError("not a string")


def _required_text(value) -> str:
    if isinstance(value, str):
        return value
    raise ValueError("not a string")


def _count(value, minimum: int = 0) -> int | None:
    """An int (or its decimal string, as hand-written `mesh agent --meta` gives) >= minimum."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError("not a count")
    return value


def _required_count(minimum: int):
    def read(value) -> int:
        count = _count(value, minimum)
        if count is None:
            raise ValueError("missing")
        return count

    return read


def _flag(value) -> bool:
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    raise ValueError("not a bool")


def _fraction(value) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("not a number")
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError("not a fraction")
    return float(value)


def _state(value) -> TransferState | None:
    return None if value is None else TransferState(_required_text(value))


_READERS = {
    "fingerprint": _required_text,
    "tp": _required_count(1),
    "pp": _required_count(1),
    "rank": _required_count(0),
    "ready": _flag,
    "role": _text,
    "model": _text,
    "vllm": _text,
    "zone": _text,
    "host": _text,
    "endpoint": _text,
    "state": _state,
    "progress": _fraction,
    "load": _count,
    "capacity": _count,
    "upstream": _text,
    "retained_bytes": _count,
    "content": _text,
    "compile_key": _text,
}


_FIELD_NAMES = tuple(f.name for f in fields(PeerRecord))
_PARSED: dict[tuple, PeerRecord | None] = {}  # PeerRecord.from_meta's results by content
_PARSED_MAX = 4096  # about 4 entries per member of a 1000-member mesh; then start over
_MISSING = object()
