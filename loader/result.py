"""The one `netloader result: {json}` line every rank logs when loading ends (contract)."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import orjson

logger = logging.getLogger(__name__)
RESULT_PREFIX = "netloader result: "


@dataclass
class LoadResult:
    rank: int
    source: str  # "peer" | "disk"
    peer: str | None
    bytes: int
    seconds: float
    fallback_reason: str | None

    def to_json(self) -> str:
        fields = asdict(self)
        fields["seconds"] = round(self.seconds, 3)
        return orjson.dumps(fields).decode()


def log_result(result: LoadResult) -> None:
    logger.info("%s%s", RESULT_PREFIX, result.to_json())
