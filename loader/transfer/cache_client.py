"""Fetch one compile cache entry from a source's control channel and install it.

The client asks for its own compile key; a source whose key differs answers with its
factors, so the refusal names what differs (vLLM or torch version, config hash, device,
...). Otherwise every listed file is read in ranges, staged beside the cache, verified
against its keyed checksum, and only a fully verified entry is moved into place
(loader.transfer.cache_files). Anything wrong: nothing is written, the reason is returned.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import zmq

from loader.config import TransferSettings, parse_host_port
from loader.transfer import cache_wire, protocol
from loader.transfer.cache_files import Installation, InstallReport
from loader.transfer.checksum import checksum_key
from loader.transfer.client import open_control_socket, probe_tcp
from loader.transfer.resume import SourceFailure
from mesh.security import close_context

log = logging.getLogger(__name__)


@dataclass
class CacheFetch:
    source: str
    failure: str | None  # None: installed
    report: InstallReport | None = None
    bytes: int = 0
    model_infos: dict = field(default_factory=dict)


def fetch_cache(
    source: str,
    key: str,
    factors: dict[str, str],
    root: str,
    settings: TransferSettings,
    keys,
    deadline: float,
) -> CacheFetch:
    """Fetch the entry for `key` from `source` into the cache under `root`, by
    `deadline` (time.monotonic()). Never raises for the source's misbehaviour."""
    return _with_source(
        source, settings, keys, deadline,
        lambda sock: _Fetch(sock, key, factors, root, settings, keys, deadline, source).run(),
    )


def fetch_model_infos(source: str, settings: TransferSettings, keys, deadline: float) -> CacheFetch:
    """vLLM's model-class inspection results the source holds (validated, not written):
    `model_infos` of the result."""

    def ask(sock) -> CacheFetch:
        fetch = _Fetch(sock, "", {}, "", settings, keys, deadline, source)
        msg = fetch.decode(fetch.ask(cache_wire.model_info_get_message())[0])
        if msg["type"] == "nack":
            raise SourceFailure("refused: " + protocol.clean_reason(msg.get("reason", "")))
        try:
            return CacheFetch(source, None, model_infos=cache_wire.parse_model_info(msg))
        except protocol.ProtocolError as exc:
            raise SourceFailure(f"bad reply: {exc}") from None

    return _with_source(source, settings, keys, deadline, ask)


def _with_source(source: str, settings: TransferSettings, keys, deadline: float, work) -> CacheFetch:
    """`work(socket)` on a control socket connected to `source`; its failure as a result."""
    if keys is None:
        return CacheFetch(source, "no cluster secret: compile caches move only between "
                                  "authenticated peers (they hold code)")
    context = zmq.Context()
    try:
        host, port = parse_host_port("source", source)
        probe_tcp(host, port, min(settings.connect_timeout_s, _left(deadline)))
        sock = open_control_socket(context, host, port, settings, keys)
        try:
            return work(sock)
        finally:
            sock.close(linger=0)
    except (SourceFailure, ValueError) as exc:
        return CacheFetch(source, str(exc))
    except Exception as exc:  # never let one source's failure escape
        log.debug("compile cache from %s failed", source, exc_info=True)
        return CacheFetch(source, f"unexpected {type(exc).__name__}: {str(exc)[:200]}")
    finally:
        close_context(context)


class _Fetch:
    def __init__(self, sock, key, factors, root, settings, keys, deadline, source):
        self.sock: zmq.Socket = sock
        self.key = key
        self.factors = factors
        self.root = root
        self.settings: TransferSettings = settings
        self.checksum_key = checksum_key(keys)
        self.deadline = deadline
        self.source = source

    def run(self) -> CacheFetch:
        offer = self._offer()
        installation = Installation(self.root, self.checksum_key)
        try:
            for index, file in enumerate(offer.files):
                installation.begin(file)
                offset = 0
                while offset < file.size:
                    data = self._read(index, offset, min(cache_wire.CHUNK_BYTES, file.size - offset))
                    installation.write(offset, data)
                    offset += len(data)
                installation.end()
            report = installation.commit(list(offer.entries))
        except (ValueError, OSError) as exc:
            raise SourceFailure(f"entry refused: {exc}") from None
        finally:
            installation.discard()
        return CacheFetch(self.source, None, report, offer.total_bytes)

    def _offer(self) -> cache_wire.CacheOffer:
        frames = self.ask(cache_wire.get_message(self.key))
        msg = self.decode(frames[0])
        if msg["type"] in ("nack", "busy"):
            raise SourceFailure("refused: " + protocol.clean_reason(msg.get("reason", "")))
        try:
            offer = cache_wire.parse_offer(msg, self.settings.compile_cache_max_mb << 20)
        except protocol.ProtocolError as exc:
            raise SourceFailure(f"bad offer: {exc}") from None
        if offer.key != self.key:
            why = cache_wire.first_difference(self.factors, offer.factors) or "factors unknown"
            raise SourceFailure(f"compile key differs: {why}")
        if not offer.files:
            raise SourceFailure("the source's entry is empty")
        return offer

    def _read(self, index: int, offset: int, length: int) -> bytes:
        frames = self.ask(cache_wire.read_message(self.key, index, offset, length))
        msg = self.decode(frames[0])
        if msg["type"] == "nack":
            raise SourceFailure("refused: " + protocol.clean_reason(msg.get("reason", "")))
        try:
            got = cache_wire.parse_data_header(msg)
        except protocol.ProtocolError as exc:
            raise SourceFailure(f"bad reply: {exc}") from None
        if got != (index, offset) or len(frames) != 2 or not 0 < len(frames[1]) <= length:
            raise SourceFailure(f"bad reply: not the {length} bytes at {offset} of file {index}")
        return frames[1]

    def ask(self, msg: dict) -> list[bytes]:
        timeout_s = min(self.settings.handshake_timeout_s, _left(self.deadline))
        try:
            self.sock.send(protocol.encode(msg))
        except zmq.Again:
            raise SourceFailure("no ZeroMQ session (not a netloader source, hung, or "
                                "it rejected our cluster key)") from None
        if not self.sock.poll(int(timeout_s * 1000), zmq.POLLIN):
            raise SourceFailure(f"timed out after {timeout_s:.3g}s (no answer)")
        return self.sock.recv_multipart(zmq.NOBLOCK)

    def decode(self, payload: bytes) -> dict:
        try:
            return protocol.decode(payload, 1 << 22)
        except protocol.ProtocolError as exc:
            raise SourceFailure(f"bad reply: {exc}") from None


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise SourceFailure("compile cache deadline passed")
    return left
