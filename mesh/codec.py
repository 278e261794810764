"""Wire format (orjson) and validation of every field before a message touches state.

`decode` never raises: a malformed message yields None and is counted by reason.
Keys are short because they are sent several times a second by every member.

Message types (all carry "v" (version), "t" (type); member messages also "f" (sender
name) and, when the receiver may answer, "fa" (sender "host:port")):
  ping  q (seq) tg (target name) [u (entries)]      direct probe
  ack   q [u]                                        answer to ping (or forwarded)
  preq  q tg ta (target addr)                        ask the receiver to probe tg
  nack  q                                            indirect probe got no answer
  gos   u                                            gossip of pending updates
  syn   h (view hash)                                anti-entropy: do our views differ?
  dig   h d ([[name, incarnation, state], ...])      they do: here is my digest
  dlt   u [w (names wanted)]                         entries the other side lacks
  push  u r (reply wanted)                           full state (join / reconnect)
  qry   q                                            status query from a non-member
  qres  q self ms (member rows)                      reply to qry
"""

from __future__ import annotations

import math
import re
from collections import Counter

import orjson

from .members import MAX_META_BYTES, MAX_META_KEY_CHARS, MAX_NAME_CHARS

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 1024 * 1024  # any message between members (the core keeps its own below)
MAX_STATUS_BYTES = 16 * 1024 * 1024  # a `mesh status` reply: every member with its metadata
MAX_ENTRIES = 20000
MAX_PIGGYBACK_ENTRIES = 64
MAX_META_KEYS = 32
MAX_META_STR_CHARS = 256
MAX_INT = 2**53
# Incarnations stop well below MAX_INT so that a refutation (claim + 1) is always a valid
# number; the core additionally refuses claims that jump far ahead (see core.INCARNATION_STEP).
MAX_INCARNATION = 2**52
MAX_HASH = 2**64 - 1

_ADDR_RE = re.compile(r"^(\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9_.-]{1,253}):([0-9]{1,5})$")

MEMBER_TYPES = {"ping", "ack", "preq", "nack", "gos", "syn", "dig", "dlt", "push"}
ALL_TYPES = MEMBER_TYPES | {"qry", "qres"}
REPLY_TYPES = MEMBER_TYPES - {"ack", "nack", "gos"}  # the receiver may answer: "fa" required


class Invalid(ValueError):
    pass


def encode(msg: dict) -> bytes:
    return orjson.dumps(msg)


def fit(rng, items: list, budget: int) -> list:
    """`items`, or as many of them (a random choice) as encode within `budget` bytes."""
    if len(orjson.dumps(items)) <= budget:
        return items
    rng.shuffle(items)
    fitted: list = []
    used = 2
    for item in items:
        used += len(orjson.dumps(item)) + 1
        if used > budget:
            break
        fitted.append(item)
    return fitted


def valid_addr(value) -> bool:
    if not isinstance(value, str) or len(value) > 262:
        return False
    m = _ADDR_RE.match(value)
    return bool(m) and 0 < int(m.group(2)) < 65536


_WHITESPACE_RE = re.compile(r"\s")


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


def _entry(value) -> dict:
    if not isinstance(value, dict):
        raise Invalid("entry")
    state = _int(value.get("s"), 0, 3)
    out = {
        "n": _name(value.get("n")),
        "a": _addr(value.get("a")),
        "i": _int(value.get("i"), 0, MAX_INCARNATION),
        "s": state,
    }
    if "m" in value:
        if state != 0:
            raise Invalid("meta on non-alive entry")
        out["m"] = validate_meta(value["m"])
    if "f" in value:
        if state != 1:
            raise Invalid("accuser on non-suspect entry")
        out["f"] = _name(value["f"])
    return out


def _entries(value, limit: int) -> list[dict]:
    return [_entry(e) for e in _list(value, limit)]


def _digest_row(value) -> list:
    if not isinstance(value, list) or len(value) != 3:
        raise Invalid("digest row")
    return [_name(value[0]), _int(value[1], 0, MAX_INCARNATION), _int(value[2], 0, 3)]


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


def _validate(msg) -> dict:
    if not isinstance(msg, dict) or msg.get("v") != PROTOCOL_VERSION:
        raise Invalid("version")
    kind = msg.get("t")
    if kind not in ALL_TYPES:
        raise Invalid("type")
    out: dict = {"v": PROTOCOL_VERSION, "t": kind}
    if kind in MEMBER_TYPES:
        out["f"] = _name(msg.get("f"))
        if kind in REPLY_TYPES or "fa" in msg:
            out["fa"] = _addr(msg.get("fa"))
    if kind in ("ping", "ack", "gos") or (kind in ("preq", "nack") and "u" in msg):
        out["u"] = _entries(msg.get("u", []), MAX_PIGGYBACK_ENTRIES)
    if kind in ("ping", "ack", "preq", "nack", "qry", "qres"):
        out["q"] = _int(msg.get("q"))
    if kind in ("ping", "preq"):
        out["tg"] = _name(msg.get("tg"))
    if kind == "preq":
        out["ta"] = _addr(msg.get("ta"))
    if kind in ("syn", "dig"):
        out["h"] = _int(msg.get("h"), 0, MAX_HASH)
    if kind == "dig":
        out["d"] = [_digest_row(r) for r in _list(msg.get("d"), MAX_ENTRIES)]
    if kind == "dlt":
        out["u"] = _entries(msg.get("u", []), MAX_ENTRIES)
        out["w"] = [_name(n) for n in _list(msg.get("w", []), MAX_ENTRIES)]
    if kind == "push":
        out["u"] = _entries(msg.get("u"), MAX_ENTRIES)
        if not isinstance(msg.get("r"), bool):
            raise Invalid("reply flag")
        out["r"] = msg["r"]
    if kind == "qres":
        out["self"] = _name(msg.get("self"))
        out["ms"] = [_member_row(r) for r in _list(msg.get("ms"), MAX_ENTRIES)]
    return out


class Decoder:
    """Decodes and validates; counts rejected messages by reason instead of raising.
    Messages over `max_bytes` are rejected before parsing."""

    def __init__(self, max_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.rejected: Counter[str] = Counter()
        self.accepted = 0

    def decode(self, data) -> dict | None:
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
