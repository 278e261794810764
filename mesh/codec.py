"""Wire format (orjson) of the typed messages in mesh/messages.py, and validation of
every field before a message touches state.

The only place that knows wire keys and the protocol version. `Decoder.decode` never
raises: a malformed message yields None and is counted by reason. Keys are short
because they are sent several times a second by every member.

Message types (all carry "v" (version), "t" (type); member messages also "f" (sender
name) and, when the receiver may answer, "fa" (sender "host:port")):
  ping  q (seq) tg (target name) [u (entries)]      Ping
  ack   q [u]                                        Ack
  preq  q tg ta (target addr)                        PingReq
  nack  q                                            Nack
  gos   u                                            Gossip
  syn   h (view hash)                                Sync
  dig   h d ([[name, incarnation, state], ...])      Digest
  dlt   u w (names wanted)                           Delta
  push  u r (reply wanted)                           PushState
  qry   q                                            StatusQuery (from a non-member)
  qres  q self ms (member rows)                      StatusReply
An entry is {"n": name, "a": addr, "i": incarnation, "s": state, ["m": meta (alive only)],
["f": accuser (suspect only)]}. "u" on preq and nack is accepted (and validated) for
compatibility, and ignored.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import orjson

from .members import ALIVE, MAX_META_BYTES, MAX_META_KEY_CHARS, MAX_NAME_CHARS, Entry
from .messages import (
    Ack,
    Delta,
    Digest,
    Gossip,
    Message,
    Nack,
    Ping,
    PingReq,
    PushState,
    StatusQuery,
    StatusReply,
    Sync,
)

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 1024 * 1024  # any message between members (the core keeps its own below)
MAX_STATUS_BYTES = 16 * 1024 * 1024  # a `mesh status` reply: every member with its metadata
MAX_ENTRIES = 20000
MAX_PIGGYBACK_ENTRIES = 64
MAX_META_KEYS = 32
MAX_META_STR_CHARS = 256
MAX_INT = 2**53
# Incarnations stop well below MAX_INT so that a refutation (claim + 1) is always a valid
# number; the core additionally refuses claims that jump far ahead (see claims.INCARNATION_STEP).
MAX_INCARNATION = 2**52
MAX_HASH = 2**64 - 1

_ADDR_RE = re.compile(r"^(\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9_.-]{1,253}):([0-9]{1,5})$")
_WHITESPACE_RE = re.compile(r"\s")


class Invalid(ValueError):
    pass


# ---------------------------------------------------------------- encoding


def entry_wire(entry: Entry) -> dict:
    wire = {"n": entry.name, "a": entry.addr, "i": entry.incarnation, "s": entry.state}
    if entry.state == ALIVE and entry.meta:
        wire["m"] = entry.meta
    if entry.accuser is not None:
        wire["f"] = entry.accuser
    return wire


def entry_size(entry: Entry) -> int:
    """Bytes `entry` takes on the wire."""
    return len(orjson.dumps(entry_wire(entry)))


def _member(kind: str, msg, addr: str | None, **fields) -> dict:
    wire = {"v": PROTOCOL_VERSION, "t": kind, "f": msg.sender}
    if addr is not None:
        wire["fa"] = addr
    wire.update(fields)
    return wire


def _with_updates(wire: dict, updates) -> dict:
    if updates:
        wire["u"] = [entry_wire(e) for e in updates]
    return wire


def to_wire(msg: Message) -> dict:
    """The wire dict of a typed message (what `encode` serialises)."""
    match msg:
        case Ping():
            wire = _member("ping", msg, msg.sender_addr, q=msg.seq, tg=msg.target)
            return _with_updates(wire, msg.updates)
        case Ack():
            return _with_updates(_member("ack", msg, msg.sender_addr, q=msg.seq), msg.updates)
        case PingReq():
            return _member("preq", msg, msg.sender_addr, q=msg.seq, tg=msg.target, ta=msg.target_addr)
        case Nack():
            return _member("nack", msg, msg.sender_addr, q=msg.seq)
        case Gossip():
            return _with_updates(_member("gos", msg, msg.sender_addr), msg.updates)
        case Sync():
            return _member("syn", msg, msg.sender_addr, h=msg.view_hash)
        case Digest():
            return _member("dig", msg, msg.sender_addr, h=msg.view_hash, d=[list(r) for r in msg.rows])
        case Delta():
            updates = [entry_wire(e) for e in msg.updates]
            return _member("dlt", msg, msg.sender_addr, u=updates, w=list(msg.wanted))
        case PushState():
            updates = [entry_wire(e) for e in msg.updates]
            return _member("push", msg, msg.sender_addr, u=updates, r=msg.reply)
        case StatusQuery():
            return {"v": PROTOCOL_VERSION, "t": "qry", "q": msg.query_id}
        case StatusReply():
            members = list(msg.members)
            return {"v": PROTOCOL_VERSION, "t": "qres", "q": msg.query_id, "self": msg.responder, "ms": members}
    raise TypeError(f"not a message: {msg!r}")


def encode(msg: Message) -> bytes:
    return orjson.dumps(to_wire(msg))


def fit(rng, items: list, budget: int, wire=None) -> list:
    """`items`, or as many of them (a random choice) as encode within `budget` bytes as
    a list; `wire(item)` is an item's wire form (default: the item itself)."""
    wires = items if wire is None else [wire(item) for item in items]
    if len(orjson.dumps(wires)) <= budget:
        return items
    pairs = list(zip(items, wires, strict=True))
    rng.shuffle(pairs)
    fitted: list = []
    used = 2
    for item, item_wire in pairs:
        used += len(orjson.dumps(item_wire)) + 1
        if used > budget:
            break
        fitted.append(item)
    return fitted


# -------------------------------------------------------------- validation


def valid_addr(value) -> bool:
    if not isinstance(value, str) or len(value) > 262:
        return False
    m = _ADDR_RE.match(value)
    return bool(m) and 0 < int(m.group(2)) < 65536


def valid_name(value) -> bool:
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_NAME_CHARS
        and value.isprintable()
        and _WHITESPACE_RE.search(value) is None
    )


def _int(value, lo: int = 0, hi: int = MAX_INT) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise Invalid("int")
    return value


def _name(value) -> str:
    if not valid_name(value):
        raise Invalid("name")
    return value


def _addr(value) -> str:
    if not valid_addr(value):
        raise Invalid("addr")
    return value


def _list(value, limit: int) -> list:
    if not isinstance(value, list) or len(value) > limit:
        raise Invalid("list")
    return value


def validate_meta(meta) -> dict:
    """Flat dict of scalars, at most MAX_META_BYTES encoded. Raises Invalid."""
    if not isinstance(meta, dict) or len(meta) > MAX_META_KEYS:
        raise Invalid("meta")
    for key, value in meta.items():
        if not isinstance(key, str) or not 0 < len(key) <= MAX_META_KEY_CHARS:
            raise Invalid("meta key")
        if value is None or isinstance(value, bool):
            continue
        if type(value) is int:
            if abs(value) > MAX_INT:
                raise Invalid("meta int")
        elif type(value) is float:
            if not math.isfinite(value):
                raise Invalid("meta float")
        elif isinstance(value, str):
            if len(value) > MAX_META_STR_CHARS:
                raise Invalid("meta str")
        else:
            raise Invalid("meta value type")
    if len(orjson.dumps(meta)) > MAX_META_BYTES:
        raise Invalid("meta size")
    return meta


def _entry(value) -> Entry:
    if not isinstance(value, dict):
        raise Invalid("entry")
    state = _int(value.get("s"), 0, 3)
    name, addr = _name(value.get("n")), _addr(value.get("a"))
    incarnation = _int(value.get("i"), 0, MAX_INCARNATION)
    meta: dict = {}
    accuser = None
    if "m" in value:
        if state != ALIVE:
            raise Invalid("meta on non-alive entry")
        meta = validate_meta(value["m"])
    if "f" in value:
        if state != 1:
            raise Invalid("accuser on non-suspect entry")
        accuser = _name(value["f"])
    return Entry(name, addr, incarnation, state, meta, accuser)


def _entries(value, limit: int) -> tuple[Entry, ...]:
    return tuple(_entry(e) for e in _list(value, limit))


def _digest_row(value) -> tuple[str, int, int]:
    if not isinstance(value, list) or len(value) != 3:
        raise Invalid("digest row")
    return (_name(value[0]), _int(value[1], 0, MAX_INCARNATION), _int(value[2], 0, 3))


def _member_row(value) -> dict:
    if not isinstance(value, dict):
        raise Invalid("member row")
    state = value.get("state")
    if state not in ("alive", "suspect", "dead", "left"):
        raise Invalid("state")
    rtt = value.get("rtt")
    heard = value.get("last_heard")
    for number in (rtt, heard):
        if number is not None and (type(number) not in (int, float) or not 0 <= number < 1e9):
            raise Invalid("number")
    return {
        "name": _name(value.get("name")),
        "addr": _addr(value.get("addr")),
        "state": state,
        "incarnation": _int(value.get("incarnation"), 0, MAX_INCARNATION),
        "meta": validate_meta(value.get("meta", {})),
        "rtt": rtt,
        "last_heard": heard,
    }


# One parser per type. Fields are checked in a fixed order (sender, sender address,
# updates, then the type's own fields), which decides the reason a message with several
# bad fields is counted under.


def _sender(raw: dict, reply_expected: bool) -> tuple[str, str | None]:
    """The sender's name and address; the address is required when the receiver may answer."""
    sender = _name(raw.get("f"))
    addr = _addr(raw.get("fa")) if reply_expected or "fa" in raw else None
    return sender, addr


def _piggyback(raw: dict) -> tuple[Entry, ...]:
    return _entries(raw.get("u", []), MAX_PIGGYBACK_ENTRIES)


def _ignored_piggyback(raw: dict) -> None:
    if "u" in raw:
        _piggyback(raw)  # validated, then ignored


def _ping(raw: dict) -> Ping:
    sender, addr = _sender(raw, True)
    updates = _piggyback(raw)
    return Ping(sender, addr, _int(raw.get("q")), _name(raw.get("tg")), updates)


def _ack(raw: dict) -> Ack:
    sender, addr = _sender(raw, False)
    updates = _piggyback(raw)
    return Ack(sender, _int(raw.get("q")), updates, addr)


def _ping_req(raw: dict) -> PingReq:
    sender, addr = _sender(raw, True)
    _ignored_piggyback(raw)
    return PingReq(sender, addr, _int(raw.get("q")), _name(raw.get("tg")), _addr(raw.get("ta")))


def _nack(raw: dict) -> Nack:
    sender, addr = _sender(raw, False)
    _ignored_piggyback(raw)
    return Nack(sender, _int(raw.get("q")), addr)


def _gossip(raw: dict) -> Gossip:
    sender, addr = _sender(raw, False)
    return Gossip(sender, _piggyback(raw), addr)


def _sync(raw: dict) -> Sync:
    sender, addr = _sender(raw, True)
    return Sync(sender, addr, _int(raw.get("h"), 0, MAX_HASH))


def _digest(raw: dict) -> Digest:
    sender, addr = _sender(raw, True)
    view_hash = _int(raw.get("h"), 0, MAX_HASH)
    return Digest(sender, addr, view_hash, tuple(_digest_row(r) for r in _list(raw.get("d"), MAX_ENTRIES)))


def _delta(raw: dict) -> Delta:
    sender, addr = _sender(raw, True)
    updates = _entries(raw.get("u", []), MAX_ENTRIES)
    return Delta(sender, addr, updates, tuple(_name(n) for n in _list(raw.get("w", []), MAX_ENTRIES)))


def _push(raw: dict) -> PushState:
    sender, addr = _sender(raw, True)
    updates = _entries(raw.get("u"), MAX_ENTRIES)
    if not isinstance(raw.get("r"), bool):
        raise Invalid("reply flag")
    return PushState(sender, addr, updates, raw["r"])


def _status_query(raw: dict) -> StatusQuery:
    return StatusQuery(_int(raw.get("q")))


def _status_reply(raw: dict) -> StatusReply:
    query_id = _int(raw.get("q"))
    responder = _name(raw.get("self"))
    return StatusReply(query_id, responder, tuple(_member_row(r) for r in _list(raw.get("ms"), MAX_ENTRIES)))


_PARSERS = {
    "ping": _ping,
    "ack": _ack,
    "preq": _ping_req,
    "nack": _nack,
    "gos": _gossip,
    "syn": _sync,
    "dig": _digest,
    "dlt": _delta,
    "push": _push,
    "qry": _status_query,
    "qres": _status_reply,
}


def _validate(raw) -> Message:
    if not isinstance(raw, dict) or raw.get("v") != PROTOCOL_VERSION:
        raise Invalid("version")
    kind = raw.get("t")
    if kind not in _PARSERS:  # (an unhashable type is counted as malformed)
        raise Invalid("type")
    return _PARSERS[kind](raw)


class Decoder:
    """Decodes and validates; counts rejected messages by reason instead of raising.
    Messages over `max_bytes` are rejected before parsing."""

    def __init__(self, max_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.rejected: Counter[str] = Counter()
        self.accepted = 0

    def decode(self, data) -> Message | None:
        try:
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise Invalid("not bytes")
            if len(data) > self.max_bytes:
                raise Invalid("too large")
            try:
                raw = orjson.loads(data)
            except orjson.JSONDecodeError as e:
                raise Invalid("json") from e
            msg = _validate(raw)
        except Invalid as e:
            self.rejected[str(e) or "invalid"] += 1
            return None
        except (RecursionError, ValueError, TypeError, OverflowError):
            self.rejected["malformed"] += 1
            return None
        self.accepted += 1
        return msg

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())
