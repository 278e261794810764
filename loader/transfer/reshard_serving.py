"""A source's side of resharding: it describes its shard (its ShardLayout), checks the
slices a client of another shape asks for against it, and serves exactly those, with
keyed checksums it computes over them (cached per distinct request, a few at most)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from loader.transfer import protocol
from loader.transfer.device import TransferDevice
from loader.transfer.layout import ShardLayout
from loader.transfer.manifest import Manifest, build_manifest
from loader.transfer.pieces import piece_views
from loader.transfer.reshard_protocol import layout_reply_message, parse_layout_query
from loader.transfer.served_plans import ServedPlan, ServedPlans

CACHED_REQUESTS = 8  # distinct requests whose checksums are kept (one per client shape)


@dataclass(frozen=True)
class Pieces:
    """What one resharding session sends: views into the served tensors, by piece name."""

    tensors: dict[str, torch.Tensor]
    manifest: Manifest


class ReshardServing:
    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        layout: ShardLayout | None,
        backend: str,
        served: ServedPlans,
    ) -> None:
        """`served`: the server's own plans (their device, algorithm, key) for the pieces'."""
        self._tensors = tensors
        self.layout = layout
        self._backend = backend
        self._served = served
        self._plans: OrderedDict[str, ServedPlans] = OrderedDict()
        self._lock = threading.Lock()

    def describe(self, query: dict) -> dict:
        """The reply to a layout query (a ProtocolError propagates for a malformed one)."""
        content = parse_layout_query(query)
        reason = self._unavailable(content)
        if reason:
            return protocol.nack_message(reason)
        return layout_reply_message(self.layout)

    def _unavailable(self, content: str) -> str | None:
        if self.layout is None:
            return "this source cannot describe its shard (no resharding from it)"
        if content != self.layout.content:
            return f"content mismatch: source {self.layout.content[:16]}, client {content[:16]}"
        return None

    def admit(self, hello: protocol.Hello, complete: bool) -> tuple[str | None, Pieces | None]:
        """(why the request is refused, None) or (None, the pieces to send). Only complete
        tensors are resharded (a relay still receiving serves its own shape only)."""
        if not complete:
            return "source still loading: serves other shapes once complete", None
        reason = self._unavailable(hello.fingerprint)
        if reason:
            return reason, None
        if hello.backend != self._backend:
            return f"backend mismatch: source uses {self._backend}, client {hello.backend}", None
        described = self.layout.by_name()
        why_not = dict(self.layout.unsupported)
        for r in hello.reshard:
            held = described.get(r.name)
            if held is None:
                return f"reshard: {r.name!r} {why_not.get(r.name, 'is not held here')}", None
            if held.dim != r.dim:
                return f"reshard: {r.piece_name} is not split along that dimension here", None
        try:
            views = piece_views(self._tensors, list(hello.reshard), at_source=True)
        except ValueError as exc:
            return f"reshard: {exc}", None
        manifest = build_manifest(views)
        difference = hello.manifest.first_difference(manifest)
        if difference:
            return f"manifest mismatch: {difference}", None
        return None, Pieces(views, manifest)

    def plan_for(self, pieces: Pieces, bucket_bytes: int, device: TransferDevice) -> ServedPlan:
        """The plan and keyed checksums of these pieces (cached for the latest requests)."""
        key = pieces.manifest.digest()
        with self._lock:
            plans = self._plans.pop(key, None)
            if plans is None:
                plans = self._served.of(pieces.tensors, pieces.manifest)
            self._plans[key] = plans
            while len(self._plans) > CACHED_REQUESTS:
                self._plans.popitem(last=False)
        return plans.plan_for(bucket_bytes, device)
