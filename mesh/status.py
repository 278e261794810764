"""`mesh status`: ask any reachable seed for its view of the mesh, and format it."""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import zmq

from .addresses import resolve_seeds, zmq_endpoint
from .codec import MAX_STATUS_BYTES, Decoder, encode
from .messages import StatusQuery, StatusReply
from .security import ClusterKeys, close_context, secure_client


class StatusError(Exception):
    """The mesh could not be reached; the message is the one-line reason."""


def query_members(
    seed_specs: list[str], keys: ClusterKeys | None, timeout_s: float = 3.0
) -> tuple[str, list[dict]]:
    """(name of the answering agent, its member rows); StatusError after `timeout_s`."""
    addrs = resolve_seeds(seed_specs)
    if not addrs:
        raise StatusError(f"no seed address could be resolved from {','.join(seed_specs) or '(none)'}")
    query_id = random.randrange(1 << 52)
    request = encode(StatusQuery(query_id))
    decoder = Decoder(max_bytes=MAX_STATUS_BYTES)
    context = zmq.Context()
    sockets = []
    try:
        poller = zmq.Poller()
        for addr in addrs:
            sock = context.socket(zmq.DEALER)
            sock.linger = 0
            sock.maxmsgsize = MAX_STATUS_BYTES
            if addr.startswith("["):
                sock.ipv6 = True
            secure_client(sock, keys)
            sock.connect(zmq_endpoint(addr))
            sock.send(request, zmq.NOBLOCK)
            poller.register(sock, zmq.POLLIN)
            sockets.append(sock)
        deadline = time.monotonic() + timeout_s
        while (remaining := deadline - time.monotonic()) > 0:
            for sock, _ in poller.poll(int(remaining * 1000) + 1):
                msg = decoder.decode(sock.recv())
                if isinstance(msg, StatusReply) and msg.query_id == query_id:
                    return msg.responder, list(msg.members)
    finally:
        for sock in sockets:
            sock.close(0)
        close_context(context)
    hint = " (is --secret-file the cluster's?)" if keys is not None else " (does the mesh require --secret-file?)"
    raise StatusError(f"no agent answered at {', '.join(addrs)} within {timeout_s:g}s{hint}")


# an escape or control sequence: ESC or CSI (0x9b), parameters, intermediates, final byte
_ESCAPE_SEQUENCE_RE = re.compile(r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]?|\x1b[ -~]?")


def printable(text: str) -> str:
    """`text` safe to print on a terminal: escape sequences and every other non-printable
    character (C0, DEL, C1, line separators, bidi controls) become one "?" each."""
    text = _ESCAPE_SEQUENCE_RE.sub("?", text)
    return text if text.isprintable() else "".join(c if c.isprintable() else "?" for c in text)


def _short(value, width: int) -> str:
    text = "-" if value is None or value == "" else printable(str(value))
    return text if len(text) <= width else text[: width - 1] + "…"


def _ago(age_s) -> str:
    if age_s is None:
        return "never"
    return f"{age_s:.1f}s ago"


def _size(n) -> str:
    """A byte count, human-sized; "-" when not given."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return "-"


MetaCell = Callable[[Mapping[str, Any]], str]


def _text(key: str, width: int) -> MetaCell:
    return lambda meta: _short(meta.get(key), width)


def _shape(meta: Mapping[str, Any]) -> str:
    tp, pp = meta.get("tp"), meta.get("pp")
    return f"{tp}x{pp}" if tp is not None or pp is not None else "-"


# The metadata shown as columns: well-known keys that netloader ranks advertise (the mesh
# gives them no meaning; every key is in `--json`). RETAINED: bytes kept only to serve.
META_COLUMNS: tuple[tuple[str, MetaCell], ...] = (
    ("FINGERPRINT", _text("fingerprint", 12)),
    ("VLLM", _text("vllm", 16)),
    ("TPxPP", _shape),
    ("RANK", _text("rank", 6)),
    ("ENDPOINT", _text("endpoint", 28)),
    ("LOAD", _text("load", 8)),
    ("RETAINED", lambda meta: _size(meta.get("retained_bytes"))),
)


def format_table(rows: list[dict]) -> str:
    """A text table of member rows; names and metadata come from the network, so nothing
    in it can move the cursor, clear the screen or otherwise talk to the terminal."""
    header = ["NAME", "ADDRESS", "STATE", "INC", *(h for h, _ in META_COLUMNS), "RTT", "LAST HEARD"]
    table = [header]
    for row in sorted(rows, key=lambda r: r["name"]):
        meta = row.get("meta", {})
        rtt_s = row.get("rtt")
        cells = [
            _short(row["name"], 40),
            row["addr"],
            row["state"],
            str(row["incarnation"]),
            *(cell(meta) for _, cell in META_COLUMNS),
            "-" if rtt_s is None else f"{rtt_s * 1000:.2f}ms",
            _ago(row.get("last_heard")),
        ]
        table.append([printable(cell) for cell in cells])
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table)
