"""Resharding as a stage of a rank's load: after the sources of its own shape (mesh
upstreams, SOURCE), the sources of these weights in another TP/PP shape; then disk."""

from __future__ import annotations

import logging

from torch import nn

from loader.distribution.peer_record import RankIdentity
from loader.integration.shard_layout import shard_layout
from loader.transfer.client import FetchOutcome, FetchRequest
from loader.transfer.layout import ShardLayout
from loader.transfer.reshard_client import fetch_resharded

log = logging.getLogger(__name__)


def rank_layout(model: nn.Module, tensors: dict | None, identity: RankIdentity) -> ShardLayout | None:
    """This rank's layout over `tensors` (those it serves), or None (no content id, or
    the model has no storage yet). Never raises: a rank that cannot describe itself just
    does not reshard."""
    if identity.content is None or tensors is None:
        return None
    try:
        layout = shard_layout(model, list(tensors), identity.content, identity.tp, identity.pp, identity.rank)
    except Exception as exc:
        log.warning("rank %d: cannot describe its shard for resharding: %s", identity.rank, exc)
        return None
    if layout.unsupported:
        name, why = layout.unsupported[0]
        log.info(
            "rank %d: %d of %d tensors cannot be resharded (first: %s: %s): ranks of another "
            "shape load from disk", identity.rank, len(layout.unsupported),
            len(layout.unsupported) + len(layout.params), name, why,
        )
    return layout


def reshard_after(
    outcome: FetchOutcome, sources: list[str], layout: ShardLayout, tensors, request: FetchRequest
) -> FetchOutcome:
    """The same-shape stages failed (`outcome`): fill `tensors` from `sources` of any shape.
    Sources that failed for another reason than refusing our shape are not asked again."""
    failed = {src for src, why in outcome.failures if not why.startswith("refused:")}
    candidates = [s for s in sources if s not in failed]
    if not candidates:
        return outcome
    log.info(
        "rank %d: no source of this shape served the weights; resharding from %d source(s) "
        "of these weights in another shape", request.rank, len(candidates),
    )
    resharded = fetch_resharded(candidates, layout, tensors, request.rank, request.settings, request.keys)
    resharded.failures[:0] = outcome.failures
    return resharded
