"""What a WeightServer serves and when: the strategy it is given decides which clients it
refuses beyond a mismatch, which plan and checksums a session sends, and when each
bucket may go. The default serves fixed, fully loaded tensors (everything, at once);
loader.distribution.relay serves tensors still being fetched, each bucket once verified.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol

from loader.transfer import protocol
from loader.transfer.buckets import Bucket
from loader.transfer.device import TransferDevice
from loader.transfer.served_plans import ServedPlan

if TYPE_CHECKING:
    from loader.transfer.server import WeightServer


class TransferState(StrEnum):
    """What a served rank holds; gossiped as the string (`peer_record`)."""

    ATTACHING = "attaching"  # its relay is up but nothing is received yet: not a source
    RECEIVING = "receiving"  # forwards the buckets it has verified while receiving the rest
    COMPLETE = "complete"  # holds every weight


@dataclass(eq=False)
class ServedSession:
    """One session as its strategy sees it: the plan it sends (strategies may add more)."""

    plan: ServedPlan


class ServingStrategy(Protocol):
    def attach(self, server: WeightServer) -> None:
        """Called once, by the server this strategy serves for, before it starts."""

    def prepare(self) -> None:
        """Run on a thread of its own at start; the server is ready when it returns."""

    def refusal(self, hello: protocol.Hello, bucket_bytes: int | None) -> str | None:
        """Why a client whose hello matches the served weights is refused, or None;
        `bucket_bytes` is the size it would be served (None: none fits)."""

    def open_session(self, bucket_bytes: int, device: TransferDevice) -> ServedSession:
        """The plan for a new session (on its thread; `device` is entered); raise to
        refuse it."""

    def before_bucket(self, session: ServedSession, bucket: Bucket) -> None:
        """Run before each bucket is read for sending: may wait until it may be sent;
        raise to end the session."""

    @property
    def state(self) -> TransferState:
        """COMPLETE, RECEIVING (can serve some buckets) or ATTACHING."""

    @property
    def upstream(self) -> str | None:
        """The source the served tensors are being received from, if any."""

    @property
    def verified_fraction(self) -> float:
        """The part of the served bytes that may be sent now."""


class FixedTensors:
    """Serve fixed, fully loaded tensors: every bucket may be sent at once."""

    state = TransferState.COMPLETE
    upstream = None
    verified_fraction = 1.0

    def attach(self, server: WeightServer) -> None:
        self._plans = server.plans
        self._bucket_bytes = server.settings.bucket_bytes

    def prepare(self) -> None:
        self._plans.precompute(self._bucket_bytes)

    def refusal(self, hello: protocol.Hello, bucket_bytes: int | None) -> str | None:
        return None

    def open_session(self, bucket_bytes: int, device: TransferDevice) -> ServedSession:
        return ServedSession(self._plans.plan_for(bucket_bytes, device))

    def before_bucket(self, session: ServedSession, bucket: Bucket) -> None:
        pass
