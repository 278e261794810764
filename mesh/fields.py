"""Checks of single fields from the network (names, addresses, integers, lists and member
metadata) and their limits; mesh/codec.py builds whole messages from these."""

from __future__ import annotations

import math
import re

import orjson

from .addresses import split_host_port
from .entries import MAX_META_BYTES, MAX_META_KEY_CHARS, MAX_NAME_CHARS

MAX_META_KEYS = 32
MAX_META_STR_CHARS = 256
MAX_INT = 2**53
# Incarnations stop well below MAX_INT so that a refutation (claim + 1) is always a valid
# number; the core additionally refuses claims that jump far ahead (see claims.INCARNATION_STEP).
MAX_INCARNATION = 2**52
MAX_HASH = 2**64 - 1

_WHITESPACE_RE = re.compile(r"\s")


class Invalid(ValueError):
    """A field (or message) that is not valid; the text is the reason it is counted under."""


def valid_addr(value) -> bool:
    """A member address as the mesh writes it (addresses.join_host_port): IPv6 in brackets."""
    try:
        host, _ = split_host_port(value, min_port=1)
    except ValueError:
        return False
    return (":" in host) == value.startswith("[")


def valid_name(value) -> bool:
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_NAME_CHARS
        and value.isprintable()
        and _WHITESPACE_RE.search(value) is None
    )


def check_int(value, lo: int = 0, hi: int = MAX_INT) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise Invalid("int")
    return value


def check_name(value) -> str:
    if not valid_name(value):
        raise Invalid("name")
    return value


def check_addr(value) -> str:
    if not valid_addr(value):
        raise Invalid("addr")
    return value


def check_list(value, limit: int) -> list:
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
