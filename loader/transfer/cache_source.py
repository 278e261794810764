"""A weight server's compile cache: what it offers and how it answers cache requests.

Served only over an authenticated control channel: a compile cache holds code (shared
objects vLLM loads), so a server without a cluster secret refuses, whatever the insecure
settings allow for weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loader.transfer import cache_wire
from loader.transfer.cache_files import read_range
from loader.transfer.protocol import ProtocolError, nack_message

NOT_YET = "no compile cache offered yet (vLLM still warming up, or this rank did not compile)"
NEEDS_SECRET = "compile caches are served only with a cluster secret (they hold code)"


@dataclass(frozen=True)
class ServedCache:
    root: str  # the cache root the listing is relative to (vLLM's VLLM_CACHE_ROOT)
    offer: cache_wire.CacheOffer
    model_infos: dict = field(default_factory=dict)  # vLLM's modelinfos/ files, by name

    def answer(self, msg: dict) -> tuple[dict, bytes | None]:
        """The reply (and data frame) to a decoded cache_get, cache_read or modelinfo_get."""
        if msg["type"] == "modelinfo_get":
            return cache_wire.model_info_message(self.model_infos), None
        if msg["type"] == "cache_get":
            if cache_wire.parse_get(msg) != self.offer.key:  # the client names the difference
                return cache_wire.offer_message(cache_wire.CacheOffer(self.offer.key, self.offer.factors)), None
            return cache_wire.offer_message(self.offer), None
        request = cache_wire.parse_read(msg)
        if request.key != self.offer.key or request.index >= len(self.offer.files):
            raise ProtocolError("cache_read: no such file")
        file = self.offer.files[request.index]
        if request.offset >= max(1, file.size):
            raise ProtocolError("cache_read: offset beyond the file")
        data = read_range(self.root, file, request.offset, request.length)
        return cache_wire.data_header(request.index, request.offset), data


def answer_cache_request(
    served: ServedCache | None, msg: dict, authenticated: bool
) -> tuple[dict, bytes | None]:
    """A server's answer to a cache message (a nack when it has nothing to serve)."""
    if not authenticated:
        return nack_message(NEEDS_SECRET), None
    if served is None:
        return nack_message(NOT_YET), None
    try:
        return served.answer(msg)
    except OSError as exc:
        return nack_message(f"compile cache unreadable on the source: {exc.strerror or exc}"), None
