"""The messages members exchange, as typed values.

The core consumes and produces these; mesh/codec.py alone turns them into wire bytes
and back (short keys, the protocol version) and validates every field that arrives.
`sender` is the sending member's name; `sender_addr` its "host:port", required on the
messages the receiver answers and optional (None) on the others.
"""

from __future__ import annotations

from dataclasses import dataclass

from .entries import Entry, MetaUpdate

# (name, incarnation, state) of one member: what anti-entropy compares
DigestRow = tuple[str, int, int]


@dataclass(frozen=True, slots=True)
class Ping:
    """Direct probe of `target`; answered with an Ack carrying the same `seq`. With
    `view_hash`, also an anti-entropy Sync: the sender's view hash, riding on a probe
    instead of a message of its own."""

    sender: str
    sender_addr: str
    seq: int
    target: str
    updates: tuple[Entry, ...] = ()
    view_hash: int | None = None


@dataclass(frozen=True, slots=True)
class Ack:
    """Answer to a Ping (or forwarded by a helper of an indirect probe)."""

    sender: str
    seq: int
    updates: tuple[Entry, ...] = ()
    sender_addr: str | None = None


@dataclass(frozen=True, slots=True)
class PingReq:
    """Ask the receiver to probe `target` at `target_addr` on the sender's behalf."""

    sender: str
    sender_addr: str
    seq: int
    target: str
    target_addr: str


@dataclass(frozen=True, slots=True)
class Nack:
    """A helper's indirect probe got no answer in time (the helper itself is healthy)."""

    sender: str
    seq: int
    sender_addr: str | None = None


@dataclass(frozen=True, slots=True)
class Gossip:
    """Pending updates, sent to a few members while any are pending; the only message
    whose updates may be MetaUpdates."""

    sender: str
    updates: tuple[Entry | MetaUpdate, ...] = ()
    sender_addr: str | None = None


@dataclass(frozen=True, slots=True)
class Sync:
    """Anti-entropy: does the receiver's view hash differ from `view_hash`?"""

    sender: str
    sender_addr: str
    view_hash: int


@dataclass(frozen=True, slots=True)
class Digest:
    """The views differ: the sender's (name, incarnation, state) rows."""

    sender: str
    sender_addr: str
    view_hash: int
    rows: tuple[DigestRow, ...] = ()


@dataclass(frozen=True, slots=True)
class Delta:
    """Entries the receiver lacks, and the names of entries the sender wants."""

    sender: str
    sender_addr: str
    updates: tuple[Entry, ...] = ()
    wanted: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PushState:
    """Full state (join, reconnect); with `reply`, the receiver answers with its own."""

    sender: str
    sender_addr: str
    updates: tuple[Entry, ...]
    reply: bool


@dataclass(frozen=True, slots=True)
class StatusQuery:
    """`mesh status` asking an agent, from outside the mesh, for its member rows."""

    query_id: int


@dataclass(frozen=True, slots=True)
class StatusReply:
    """The answer to a StatusQuery: the responder's name and one row per member
    (mesh.member.Member.as_dict)."""

    query_id: int
    responder: str
    members: tuple[dict, ...] = ()


MemberMessage = Ping | Ack | PingReq | Nack | Gossip | Sync | Digest | Delta | PushState
Message = MemberMessage | StatusQuery | StatusReply
