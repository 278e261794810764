"""Control messages between a transfer client and a weight server (orjson over ZeroMQ).

client -> server: hello (identity, manifest, largest bucket size, optionally the buckets
                  it already holds verified: `resume`), done (result)
client -> server during a transfer: ping (session); server -> client: pong, or abort
                  when it holds no such session (loader.transfer.liveness)
server -> client: ack (session id = the secret store prefix, store port, bucket size,
                  checksum algorithm and keyed checksums, optionally the buckets it will
                  not send: `skip`, the connections of the transfer: `streams`,
                  whether it answers pings: `ping`, and whether packed buckets travel
                  as one message per item: `items`), nack (reason), busy, abort (the session failed on the
                  source before its first bucket: the reason, at once)
Every decoded message is untrusted: size, type and every field are checked here.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import orjson

from loader.config import MAX_STREAMS
from loader.transfer.checksum import ALGORITHMS
from loader.transfer.manifest import Manifest
from loader.transfer.process_group import BACKEND_BY_DEVICE
from loader.transfer.reshard_plan import SliceRequest

PROTOCOL_VERSION = 2
MAX_REASON_LEN = 500
MIN_BUCKET_BYTES = 1 << 10
MAX_BUCKET_BYTES = 1 << 34
MAX_BUCKETS = 10_000_000
MAX_RANGES = 100_000

_HEX_RE = re.compile(r"^[0-9a-f]{1,128}$")
_SESSION_RE = re.compile(r"^[0-9a-f]{32,64}$")  # >= 128 bits: it is a credential
_CHECKSUM_RE = re.compile(r"^[0-9a-f\-]{1,128}$")


class ProtocolError(ValueError):
    """A malformed or unexpected control message."""


@dataclass(frozen=True)
class Resume:
    """Buckets (of `bucket_bytes`) the client verified in an earlier, interrupted attempt,
    as half-open index ranges (kept as ranges: an untrusted peer's list is expanded only
    up to the real number of buckets)."""

    bucket_bytes: int
    have: tuple[tuple[int, int], ...]

    @classmethod
    def of(cls, bucket_bytes: int, indices) -> Resume:
        return cls(bucket_bytes, tuple((a, b) for a, b in to_ranges(indices)))

    def indices(self, limit: int) -> frozenset[int]:
        return expand_ranges(self.have, limit)


@dataclass(frozen=True)
class Hello:
    fingerprint: str
    rank: int
    manifest: Manifest
    backend: str
    max_bucket_bytes: int
    resume: Resume | None = None
    # resharding (loader.transfer.reshard_serving): the slices asked for, in manifest
    # order; `fingerprint` is then the content id and `manifest` lists the slices
    reshard: tuple[SliceRequest, ...] | None = None


@dataclass(frozen=True)
class Ack:
    session: str
    store_port: int
    bucket_bytes: int
    algorithm: str
    checksums: tuple[str, ...]
    manifest_digest: str
    skip: frozenset[int] = frozenset()
    streams: int = 1  # connections of the transfer group (Gloo); absent on the wire: 1
    ping: bool = False  # the source answers pings (loader.transfer.liveness)
    items: bool = False  # packed buckets travel as one message per item (buckets.message_spans)


@dataclass(frozen=True)
class Refusal:
    busy: bool
    reason: str


@dataclass(frozen=True)
class Done:
    session: str
    ok: bool
    reason: str | None


def encode(msg: dict) -> bytes:
    return orjson.dumps(msg)


def decode(payload: bytes, max_bytes: int) -> dict:
    if len(payload) > max_bytes:
        raise ProtocolError(f"message of {len(payload)} bytes exceeds {max_bytes}")
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise ProtocolError("message is not JSON") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        raise ProtocolError("message is not an object with a 'type'")
    return obj


def hello_message(
    fingerprint: str,
    rank: int,
    manifest: Manifest,
    backend: str,
    max_bucket_bytes: int,
    resume: Resume | None = None,
    reshard: list[SliceRequest] | None = None,
) -> dict:
    msg = {
        "type": "hello",
        "v": PROTOCOL_VERSION,
        "fingerprint": fingerprint,
        "rank": rank,
        "manifest": manifest.to_wire(),
        "backend": backend,
        "max_bucket_bytes": max_bucket_bytes,
    }
    if resume is not None and resume.have:
        msg["resume"] = {"bucket_bytes": resume.bucket_bytes, "have": [list(r) for r in resume.have]}
    if reshard is not None:
        msg["reshard"] = [r.to_wire() for r in reshard]
    return msg


def ack_message(ack: Ack) -> dict:
    msg = {
        "type": "ack",
        "session": ack.session,
        "store_port": ack.store_port,
        "bucket_bytes": ack.bucket_bytes,
        "algorithm": ack.algorithm,
        "checksums": list(ack.checksums),
        "manifest_digest": ack.manifest_digest,
    }
    if ack.skip:
        msg["skip"] = to_ranges(ack.skip)
    if ack.streams != 1:
        msg["streams"] = ack.streams
    if ack.ping:
        msg["ping"] = True
    if ack.items:
        msg["items"] = True
    return msg


def to_ranges(indices) -> list[list[int]]:
    """Sorted indices as half-open [start, stop) ranges: compact for long verified runs."""
    ranges: list[list[int]] = []
    for i in sorted(indices):
        if ranges and ranges[-1][1] == i:
            ranges[-1][1] = i + 1
        else:
            ranges.append([i, i + 1])
    return ranges


def expand_ranges(ranges, limit: int) -> frozenset[int]:
    """The indices below `limit` that half-open [start, stop) ranges cover."""
    return frozenset(i for a, b in ranges for i in range(a, min(b, limit)))


def parse_ranges(name: str, value, limit: int) -> tuple[tuple[int, int], ...]:
    """Untrusted [[start, stop], ...], sorted and disjoint, with 0 <= start < stop <= limit
    (so the ranges cover at most `limit` indices)."""
    if not isinstance(value, list) or len(value) > MAX_RANGES:
        raise ProtocolError(f"{name}: expected a list of at most {MAX_RANGES} [start, stop] ranges")
    ranges: list[tuple[int, int]] = []
    for pair in value:
        if not isinstance(pair, list) or len(pair) != 2:
            raise ProtocolError(f"{name}: expected [start, stop] pairs")
        floor = ranges[-1][1] if ranges else 0
        if floor >= limit:
            raise ProtocolError(f"{name}: ranges overlap, are unsorted or exceed {limit}")
        start = int_field(f"{name}[].start", pair[0], floor, limit - 1)
        ranges.append((start, int_field(f"{name}[].stop", pair[1], start + 1, limit)))
    return tuple(ranges)


def nack_message(reason: str, busy: bool = False) -> dict:
    return {"type": "busy" if busy else "nack", "reason": reason[:MAX_REASON_LEN]}


def abort_message(session: str, reason: str) -> dict:
    return {"type": "abort", "session": session, "reason": reason[:MAX_REASON_LEN]}


def ping_message(session: str) -> dict:
    return {"type": "ping", "session": session}


def pong_message(session: str) -> dict:
    return {"type": "pong", "session": session}


def parse_ping(obj: dict) -> str:
    return _session_of(obj, "ping")


def parse_pong(obj: dict) -> str:
    return _session_of(obj, "pong")


def _session_of(obj: dict, kind: str) -> str:
    """The session id of a message of `kind` that carries nothing else."""
    expect_fields(obj, kind, {"session"})
    return match_field("session", obj["session"], _SESSION_RE)


def parse_abort(obj: dict) -> tuple[str, str]:
    """(session, reason) of a source's abort message."""
    expect_fields(obj, "abort", {"session", "reason"})
    return match_field("session", obj["session"], _SESSION_RE), clean_reason(obj["reason"])


def done_message(session: str, ok: bool, reason: str | None) -> dict:
    return {
        "type": "done",
        "session": session,
        "ok": ok,
        "reason": (reason or "")[:MAX_REASON_LEN] or None,
    }


def parse_hello(obj: dict) -> Hello:
    expect_fields(
        obj,
        "hello",
        {"v", "fingerprint", "rank", "manifest", "backend", "max_bucket_bytes"},
        optional={"resume", "reshard"},
    )
    if obj["v"] != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {obj['v']!r}")
    try:
        manifest = Manifest.from_wire(obj["manifest"])
    except ValueError as exc:
        raise ProtocolError(str(exc)) from None
    return Hello(
        fingerprint=match_field("fingerprint", obj["fingerprint"], _HEX_RE),
        rank=int_field("rank", obj["rank"], 0, 1 << 20),
        manifest=manifest,
        backend=_choice("backend", obj["backend"], tuple(BACKEND_BY_DEVICE.values())),
        max_bucket_bytes=int_field(
            "max_bucket_bytes", obj["max_bucket_bytes"], MIN_BUCKET_BYTES, MAX_BUCKET_BYTES
        ),
        resume=_parse_resume(obj.get("resume")),
        reshard=_parse_reshard(obj.get("reshard"), len(manifest.specs)),
    )


def _parse_reshard(value, pieces: int) -> tuple[SliceRequest, ...] | None:
    """One slice per manifest entry (the manifest lists the pieces the slices make)."""
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != pieces or not value:
        raise ProtocolError(f"reshard: expected one [name, dim, start, length] per manifest tensor ({pieces})")
    try:
        return tuple(SliceRequest.from_wire(item) for item in value)
    except ValueError as exc:
        raise ProtocolError(f"reshard[]: {exc}") from None


def _parse_resume(value) -> Resume | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"bucket_bytes", "have"}:
        raise ProtocolError("resume: expected {bucket_bytes, have}")
    return Resume(
        bucket_bytes=int_field(
            "resume.bucket_bytes", value["bucket_bytes"], MIN_BUCKET_BYTES, MAX_BUCKET_BYTES
        ),
        have=parse_ranges("resume.have", value["have"], MAX_BUCKETS),
    )


def parse_reply(obj: dict, plan_length: Callable[[int], int]) -> Ack | Refusal:
    """`plan_length(bucket_bytes)` is how many buckets the client's own plan has for that
    bucket size: a checksum list of any other length is refused before it is parsed."""
    kind = obj.get("type")
    if kind in ("nack", "busy"):
        expect_fields(obj, kind, {"reason"})
        return Refusal(busy=kind == "busy", reason=clean_reason(obj["reason"]))
    expect_fields(
        obj,
        "ack",
        {
            "session",
            "store_port",
            "bucket_bytes",
            "algorithm",
            "checksums",
            "manifest_digest",
        },
        optional={"skip", "streams", "ping", "items"},
    )
    bucket_bytes = int_field("bucket_bytes", obj["bucket_bytes"], MIN_BUCKET_BYTES, MAX_BUCKET_BYTES)
    checksums = obj["checksums"]
    if not isinstance(checksums, list):
        raise ProtocolError("checksums: expected a list")
    expected = plan_length(bucket_bytes)
    if len(checksums) != expected:
        raise ProtocolError(f"checksums: {len(checksums)} for a plan of {expected} buckets")
    skip = frozenset()
    if "skip" in obj:
        limit = max(1, len(checksums))
        skip = expand_ranges(parse_ranges("skip", obj["skip"], limit), limit)
    return Ack(
        session=match_field("session", obj["session"], _SESSION_RE),
        store_port=int_field("store_port", obj["store_port"], 1, 65535),
        bucket_bytes=bucket_bytes,
        algorithm=_choice("algorithm", obj["algorithm"], ALGORITHMS),
        checksums=tuple(match_field("checksums[]", c, _CHECKSUM_RE) for c in checksums),
        manifest_digest=match_field("manifest_digest", obj["manifest_digest"], _HEX_RE),
        skip=skip,
        streams=int_field("streams", obj.get("streams", 1), 1, MAX_STREAMS),
        ping=_bool_field("ping", obj.get("ping", False)),
        items=_bool_field("items", obj.get("items", False)),
    )


def parse_done(obj: dict) -> Done:
    expect_fields(obj, "done", {"session", "ok", "reason"})
    ok = _bool_field("ok", obj["ok"])
    reason = obj["reason"]
    return Done(
        session=match_field("session", obj["session"], _SESSION_RE),
        ok=ok,
        reason=None if reason is None else clean_reason(reason),
    )


def clean_reason(value) -> str:
    """A remote-supplied reason, made safe to log: printable and bounded."""
    if not isinstance(value, str):
        raise ProtocolError("reason: expected a string")
    return "".join(c if c.isprintable() else "?" for c in value[:MAX_REASON_LEN])


def expect_fields(obj: dict, kind: str, fields: set[str], optional: set[str] = frozenset()) -> None:
    if obj.get("type") != kind:
        raise ProtocolError(f"expected a {kind!r} message, got {str(obj.get('type'))[:40]!r}")
    keys = set(obj) - {"type"} - optional
    if keys != fields:
        missing, extra = sorted(fields - keys), sorted(keys - fields)
        raise ProtocolError(f"{kind}: missing fields {missing}, unexpected fields {extra}")


def int_field(name: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ProtocolError(f"{name}: expected an integer in {lo}..{hi}")
    return value


def match_field(name: str, value, pattern: re.Pattern) -> str:
    if not isinstance(value, str) or not pattern.match(value):
        raise ProtocolError(f"{name}: malformed")
    return value


def _bool_field(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ProtocolError(f"{name}: expected a boolean")
    return value


def _choice(name: str, value, allowed) -> str:
    if value not in allowed:
        raise ProtocolError(f"{name}: expected one of {list(allowed)}")
    return value


# A relay (loader.distribution.relay) refuses with this until its own upstream transfer has started.
NOT_RECEIVING = "relay not receiving yet"


def is_retryable(reason: str) -> bool:
    """A refusal that says "not now" rather than "never": try the source again later."""
    return reason.startswith("busy:") or NOT_RECEIVING in reason
