"""Wire format (orjson) of the typed messages in mesh/messages.py, and validation of
every field before a message touches state.

The only place that knows wire keys and the protocol version. `Decoder.decode` never
raises: a malformed message yields None and is counted by reason. Keys are short
because they are sent several times a second by every member.

Message types (all carry "v" (version), "t" (type); member messages also "f" (sender
name) and, when the receiver may answer, "fa" (sender "host:port")):
  ping  q (seq) tg (target name) [u (entries)]      Ping
        [h (view hash: the sender's Sync, riding on the probe)]
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
["f": accuser (suspect only)]}; in "u" of gos only, a metadata change may come as
{"n", "i", "s": 0, "mb": base incarnation, "md": changed keys (null: removed)} instead
(a MetaUpdate: no address, no whole meta). "u" on preq and nack is accepted (and validated) for
compatibility, and ignored.
"""

from __future__ import annotations

from collections import Counter

import orjson

from .entries import ALIVE, Entry, MetaUpdate
from .fields import (
    MAX_HASH,
    MAX_INCARNATION,
    MAX_META_BYTES,
    Invalid,
    check_addr,
    check_int,
    check_list,
    check_name,
    valid_addr,
    valid_name,
    validate_meta,
)
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

# field checks and their limits live in mesh/fields.py; these names are part of the codec's API
__all__ = [
    "MAX_INCARNATION", "MAX_META_BYTES", "Invalid", "valid_addr", "valid_name", "validate_meta",
]

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 1024 * 1024  # any message between members (the core keeps its own below)
MAX_STATUS_BYTES = 16 * 1024 * 1024  # a `mesh status` reply: every member with its metadata
MAX_ENTRIES = 20000
MAX_PIGGYBACK_ENTRIES = 64

# ---------------------------------------------------------------- encoding


def entry_wire(entry: Entry | MetaUpdate) -> dict:
    if type(entry) is MetaUpdate:
        return {"n": entry.name, "i": entry.incarnation, "s": ALIVE, "mb": entry.base, "md": entry.changes}
    wire = {"n": entry.name, "a": entry.addr, "i": entry.incarnation, "s": entry.state}
    if entry.state == ALIVE and entry.meta:
        wire["m"] = entry.meta
    if entry.accuser is not None:
        wire["f"] = entry.accuser
    return wire


def entry_size(entry: Entry | MetaUpdate) -> int:
    """Bytes `entry` takes on the wire."""
    return len(orjson.dumps(entry_wire(entry)))


def _updates(entries: tuple[Entry, ...]) -> list[dict]:
    return [entry_wire(e) for e in entries]


# One function per type (rather than a generic builder: this runs for every message sent).
# Optional fields ("fa" where the receiver does not answer, "u" when empty) are left out.


def _ping_wire(m: Ping) -> dict:
    wire = {"v": PROTOCOL_VERSION, "t": "ping", "f": m.sender, "fa": m.sender_addr, "q": m.seq,
            "tg": m.target}
    if m.updates:
        wire["u"] = _updates(m.updates)
    if m.view_hash is not None:
        wire["h"] = m.view_hash
    return wire


def _with_optional(wire: dict, sender_addr: str | None, updates=()) -> dict:
    """`wire` plus the sender's address and the piggybacked updates, each when there is one."""
    if sender_addr is not None:
        wire["fa"] = sender_addr
    if updates:
        wire["u"] = _updates(updates)
    return wire


def _ack_wire(m: Ack) -> dict:
    return _with_optional({"v": PROTOCOL_VERSION, "t": "ack", "f": m.sender, "q": m.seq},
                          m.sender_addr, m.updates)


def _ping_req_wire(m: PingReq) -> dict:
    return {"v": PROTOCOL_VERSION, "t": "preq", "f": m.sender, "fa": m.sender_addr, "q": m.seq,
            "tg": m.target, "ta": m.target_addr}


def _nack_wire(m: Nack) -> dict:
    return _with_optional({"v": PROTOCOL_VERSION, "t": "nack", "f": m.sender, "q": m.seq},
                          m.sender_addr)


def _gossip_wire(m: Gossip) -> dict:
    return _with_optional({"v": PROTOCOL_VERSION, "t": "gos", "f": m.sender}, m.sender_addr,
                          m.updates)


def _sync_wire(m: Sync) -> dict:
    return {"v": PROTOCOL_VERSION, "t": "syn", "f": m.sender, "fa": m.sender_addr, "h": m.view_hash}


def _digest_wire(m: Digest) -> dict:
    return {"v": PROTOCOL_VERSION, "t": "dig", "f": m.sender, "fa": m.sender_addr, "h": m.view_hash,
            "d": m.rows}  # orjson writes tuples as arrays


def _delta_wire(m: Delta) -> dict:
    return {"v": PROTOCOL_VERSION, "t": "dlt", "f": m.sender, "fa": m.sender_addr,
            "u": _updates(m.updates), "w": list(m.wanted)}


def _push_wire(m: PushState) -> dict:
    return {"v": PROTOCOL_VERSION, "t": "push", "f": m.sender, "fa": m.sender_addr,
            "u": _updates(m.updates), "r": m.reply}


def _status_query_wire(m: StatusQuery) -> dict:
    return {"v": PROTOCOL_VERSION, "t": "qry", "q": m.query_id}


def _status_reply_wire(m: StatusReply) -> dict:
    return {"v": PROTOCOL_VERSION, "t": "qres", "q": m.query_id, "self": m.responder,
            "ms": list(m.members)}


_WIRE_FORMS = {
    Ping: _ping_wire,
    Ack: _ack_wire,
    PingReq: _ping_req_wire,
    Nack: _nack_wire,
    Gossip: _gossip_wire,
    Sync: _sync_wire,
    Digest: _digest_wire,
    Delta: _delta_wire,
    PushState: _push_wire,
    StatusQuery: _status_query_wire,
    StatusReply: _status_reply_wire,
}


def to_wire(msg: Message) -> dict:
    """The wire dict of a typed message (what `encode` serialises)."""
    form = _WIRE_FORMS.get(type(msg))
    if form is None:
        raise TypeError(f"not a message: {msg!r}")
    return form(msg)


def encode(msg: Message) -> bytes:
    form = _WIRE_FORMS.get(type(msg))
    if form is None:
        raise TypeError(f"not a message: {msg!r}")
    return orjson.dumps(form(msg))


# -------------------------------------------------------------- validation


def _entry(value) -> Entry:
    if not isinstance(value, dict):
        raise Invalid("entry")
    state = check_int(value.get("s"), 0, 3)
    name, addr = check_name(value.get("n")), check_addr(value.get("a"))
    incarnation = check_int(value.get("i"), 0, MAX_INCARNATION)
    meta: dict = {}
    accuser = None
    if "m" in value:
        if state != ALIVE:
            raise Invalid("meta on non-alive entry")
        meta = validate_meta(value["m"])
    if "f" in value:
        if state != 1:
            raise Invalid("accuser on non-suspect entry")
        accuser = check_name(value["f"])
    return Entry(name, addr, incarnation, state, meta, accuser)


def _meta_update(value: dict) -> MetaUpdate:
    if set(value) != {"n", "i", "s", "mb", "md"} or value["s"] != ALIVE:
        raise Invalid("meta update")
    name, incarnation = check_name(value["n"]), check_int(value["i"], 1, MAX_INCARNATION)
    base = check_int(value["mb"], 0, incarnation - 1)
    return MetaUpdate(name, incarnation, base, validate_meta(value["md"]))


def _entries(value, limit: int, meta_updates: bool = False) -> tuple[Entry | MetaUpdate, ...]:
    check_list(value, limit)
    if not value:
        return ()
    if meta_updates:
        return tuple([_meta_update(e) if isinstance(e, dict) and "md" in e else _entry(e) for e in value])
    return tuple([_entry(e) for e in value])


def _digest_row(value) -> tuple[str, int, int]:
    if not isinstance(value, list) or len(value) != 3:
        raise Invalid("digest row")
    name, incarnation = check_name(value[0]), check_int(value[1], 0, MAX_INCARNATION)
    return (name, incarnation, check_int(value[2], 0, 3))


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
        "name": check_name(value.get("name")),
        "addr": check_addr(value.get("addr")),
        "state": state,
        "incarnation": check_int(value.get("incarnation"), 0, MAX_INCARNATION),
        "meta": validate_meta(value.get("meta", {})),
        "rtt": rtt,
        "last_heard": heard,
    }


# One parser per type. Fields are checked in a fixed order (sender, sender address,
# updates, then the type's own fields), which decides the reason a message with several
# bad fields is counted under. The sender's address is required where the receiver answers.


def _piggyback(raw: dict) -> tuple[Entry, ...]:
    return _entries(raw["u"], MAX_PIGGYBACK_ENTRIES) if "u" in raw else ()


def _ignored_piggyback(raw: dict) -> None:
    _piggyback(raw)  # validated, then ignored


def _optional_addr(raw: dict) -> str | None:
    """The sender's address on a message nobody answers: it may be left out."""
    return check_addr(raw["fa"]) if "fa" in raw else None


def _ping(raw: dict) -> Ping:
    sender, addr = check_name(raw.get("f")), check_addr(raw.get("fa"))
    updates = _piggyback(raw)
    view_hash = check_int(raw["h"], 0, MAX_HASH) if "h" in raw else None
    return Ping(sender, addr, check_int(raw.get("q")), check_name(raw.get("tg")), updates, view_hash)


def _ack(raw: dict) -> Ack:
    sender, addr = check_name(raw.get("f")), _optional_addr(raw)
    updates = _piggyback(raw)
    return Ack(sender, check_int(raw.get("q")), updates, addr)


def _ping_req(raw: dict) -> PingReq:
    sender, addr = check_name(raw.get("f")), check_addr(raw.get("fa"))
    _ignored_piggyback(raw)
    seq, target = check_int(raw.get("q")), check_name(raw.get("tg"))
    return PingReq(sender, addr, seq, target, check_addr(raw.get("ta")))


def _nack(raw: dict) -> Nack:
    sender, addr = check_name(raw.get("f")), _optional_addr(raw)
    _ignored_piggyback(raw)
    return Nack(sender, check_int(raw.get("q")), addr)


def _gossip(raw: dict) -> Gossip:
    sender, addr = check_name(raw.get("f")), _optional_addr(raw)
    updates = _entries(raw["u"], MAX_PIGGYBACK_ENTRIES, meta_updates=True) if "u" in raw else ()
    return Gossip(sender, updates, addr)


def _sync(raw: dict) -> Sync:
    sender, addr = check_name(raw.get("f")), check_addr(raw.get("fa"))
    return Sync(sender, addr, check_int(raw.get("h"), 0, MAX_HASH))


def _digest(raw: dict) -> Digest:
    sender, addr = check_name(raw.get("f")), check_addr(raw.get("fa"))
    view_hash = check_int(raw.get("h"), 0, MAX_HASH)
    rows = tuple(_digest_row(r) for r in check_list(raw.get("d"), MAX_ENTRIES))
    return Digest(sender, addr, view_hash, rows)


def _delta(raw: dict) -> Delta:
    sender, addr = check_name(raw.get("f")), check_addr(raw.get("fa"))
    updates = _entries(raw.get("u", []), MAX_ENTRIES)
    wanted = tuple(check_name(n) for n in check_list(raw.get("w", []), MAX_ENTRIES))
    return Delta(sender, addr, updates, wanted)


def _push(raw: dict) -> PushState:
    sender, addr = check_name(raw.get("f")), check_addr(raw.get("fa"))
    updates = _entries(raw.get("u"), MAX_ENTRIES)
    if not isinstance(raw.get("r"), bool):
        raise Invalid("reply flag")
    return PushState(sender, addr, updates, raw["r"])


def _status_query(raw: dict) -> StatusQuery:
    return StatusQuery(check_int(raw.get("q")))


def _status_reply(raw: dict) -> StatusReply:
    query_id = check_int(raw.get("q"))
    responder = check_name(raw.get("self"))
    rows = tuple(_member_row(r) for r in check_list(raw.get("ms"), MAX_ENTRIES))
    return StatusReply(query_id, responder, rows)


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
