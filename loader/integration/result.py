"""The one `netloader result: {json}` line every rank logs when loading ends (contract)."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import orjson

log = logging.getLogger(__name__)
RESULT_PREFIX = "netloader result: "


@dataclass
class LoadResult:
    rank: int
    source: str  # "peer" | "disk"
    peer: str | None
    bytes: int
    seconds: float
    fallback_reason: str | None
    # phase -> seconds (lookup, transfer, disk, process_weights), logged as `<phase>_s`
    phases: dict[str, float] = field(default_factory=dict)
    retained_bytes: int = 0  # kept only to be served (raw copies of replaced parameters)
    vllm: str = field(default_factory=lambda: _vllm_version())  # the vLLM version in use
    peers: list[str] | None = None  # resharded: every source rank used (logged only then)
    # compile artifacts: "peer" | "local" | "none: <reason>" (loader.integration.compile_cache)
    compile_cache: str = "none: not looked for"

    def to_json(self) -> str:
        fields = asdict(self)
        if fields["peers"] is None:
            del fields["peers"]
        fields["seconds"] = round(self.seconds, 3)
        for phase, seconds in fields.pop("phases").items():
            fields[f"{phase}_s"] = round(seconds, 3)
        return orjson.dumps(fields).decode()


def _vllm_version() -> str:
    from loader.integration.vllm_compat import VLLM_VERSION

    return VLLM_VERSION


def log_result(result: LoadResult) -> None:
    log.info("%s%s", RESULT_PREFIX, result.to_json())
