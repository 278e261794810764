"""The control messages of resharding, besides the hello's `reshard` field (protocol.py):

client -> server: layout (the client's content id: "describe your shard")
server -> client: layout (the source's ShardLayout), or nack (reason)

Both over the same authenticated control channel as a transfer's hello; every field is
checked (loader.transfer.layout validates the description itself).
"""

from __future__ import annotations

import re

from loader.transfer.layout import ShardLayout
from loader.transfer.protocol import PROTOCOL_VERSION, ProtocolError, Refusal, clean_reason

_CONTENT_RE = re.compile(r"^[0-9a-f]{1,128}$")


def layout_query_message(content: str) -> dict:
    return {"type": "layout", "v": PROTOCOL_VERSION, "content": content}


def parse_layout_query(obj: dict) -> str:
    """The content id a client asks a layout for."""
    if set(obj) != {"type", "v", "content"} or obj.get("type") != "layout":
        raise ProtocolError("layout: expected {v, content}")
    if obj["v"] != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {obj['v']!r}")
    content = obj["content"]
    if not isinstance(content, str) or not _CONTENT_RE.match(content):
        raise ProtocolError("content: malformed")
    return content


def layout_reply_message(layout: ShardLayout) -> dict:
    return {"type": "layout", "layout": layout.to_wire()}


def parse_layout_reply(obj: dict) -> ShardLayout | Refusal:
    kind = obj.get("type")
    if kind in ("nack", "busy"):
        if set(obj) != {"type", "reason"}:
            raise ProtocolError(f"{kind}: expected {{reason}}")
        return Refusal(busy=kind == "busy", reason=clean_reason(obj["reason"]))
    if kind != "layout" or set(obj) != {"type", "layout"}:
        raise ProtocolError("expected a layout reply")
    try:
        return ShardLayout.from_wire(obj["layout"])
    except ValueError as exc:
        raise ProtocolError(str(exc)) from None
