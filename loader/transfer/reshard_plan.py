"""Which bytes a rank asks of which source rank when their shapes differ: pure arithmetic
over loader.transfer.layout descriptions.

The client's shard is a list of needs (a run of the logical tensor along its split
dimension and where it goes locally). Sources are taken in the order given (nearest
first): each run still uncovered is asked of the first source that holds it, so every
byte the client keeps is asked of exactly one source and nothing else is sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loader.transfer.layout import ParamLayout, Segment, ShardLayout
from loader.transfer.manifest import MAX_NAME_LEN


@dataclass(frozen=True)
class Need:
    """`logical` positions of parameter `name` (along `dim`; None: the whole tensor) that
    belong at `client_start` of the client's local tensor."""

    name: str
    dim: int | None
    logical: Segment
    client_start: int


@dataclass(frozen=True)
class SliceRequest:
    """A run of a source's local tensor along `dim` (None: all of it), for the client's
    local tensor from `client_start`."""

    name: str
    dim: int | None
    source_start: int
    client_start: int
    length: int

    @property
    def piece_name(self) -> str:
        """The name the piece travels under (unique within one source's requests)."""
        if self.dim is None:
            return self.name
        return f"{self.name}[{self.dim}:{self.source_start}+{self.length}]"

    def to_wire(self) -> list:
        return [self.name, -1 if self.dim is None else self.dim, self.source_start, self.length]

    @classmethod
    def from_wire(cls, item) -> SliceRequest:
        """An untrusted [name, dim (-1: whole), start, length] asked of a source (where it
        goes on the client is the client's business: client_start is 0)."""
        if not isinstance(item, list) or len(item) != 4:
            raise ValueError("expected [name, dim, start, length]")
        name, dim, start, length = item
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_LEN:
            raise ValueError("bad name")
        for what, value, lo in (("dim", dim, -1), ("start", start, 0), ("length", length, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value < 1 << 48:
                raise ValueError(f"bad {what}")
        return cls(name, None if dim == -1 else dim, start, 0, length)


@dataclass
class ReshardPlan:
    requests: dict[str, list[SliceRequest]] = field(default_factory=dict)  # per source
    missing: list[tuple[str, str]] = field(default_factory=list)  # (parameter, why)

    @property
    def complete(self) -> bool:
        return not self.missing


def client_needs(layout: ShardLayout) -> list[Need]:
    """Everything the client's shard holds, as needs."""
    needs = []
    for p in layout.params:
        if p.dim is None:
            needs.append(Need(p.name, None, p.placed()[0][0], 0))
            continue
        needs.extend(Need(p.name, p.dim, seg, local) for seg, local in p.placed())
    return needs


def plan_reshard(
    client: ShardLayout, needs: list[Need], sources: list[tuple[str, ShardLayout]]
) -> ReshardPlan:
    """Cover `needs` (of the client's `client` layout) from `sources`, first ones first."""
    plan = ReshardPlan()
    mine = client.by_name()
    theirs = [(source, layout.by_name()) for source, layout in sources]
    for need in needs:
        uncovered = [(need.logical.start, need.logical.stop)]
        why = "held by no source"
        for source, params in theirs:
            held = params.get(need.name)
            if held is None:
                continue
            mismatch = _mismatch(mine[need.name], held)
            if mismatch:
                why = mismatch
                continue
            uncovered = _take(need, held, uncovered, plan.requests.setdefault(source, []))
            if not uncovered:
                break
        if uncovered:
            runs = ", ".join(f"{a}..{b}" for a, b in uncovered[:3])
            where = "" if need.dim is None else f" (dim {need.dim}: {runs})"
            plan.missing.append((need.name, f"{why}{where}"))
    plan.requests = {s: _merged(r) for s, r in plan.requests.items() if r}
    return plan


def remaining_needs(needs: list[Need], received: list[SliceRequest]) -> list[Need]:
    """The needs minus what `received` (requests of sources that delivered) covered."""
    done: dict[str, list[SliceRequest]] = {}
    for r in received:
        done.setdefault(r.name, []).append(r)
    out = []
    for need in needs:
        got = done.get(need.name, [])
        if need.dim is None:
            if not got:
                out.append(need)
            continue
        got = [(r.client_start, r.client_start + r.length) for r in got if r.dim == need.dim]
        runs = [(need.client_start, need.client_start + need.logical.length)]
        for a, b in got:
            runs = _subtract(runs, a, b)
        shift = need.logical.start - need.client_start
        out.extend(Need(need.name, need.dim, Segment(a + shift, b - a), a) for a, b in runs)
    return out


def _dim(dim: int | None) -> str:
    return "replicated" if dim is None else f"dim {dim}"


def _mismatch(mine: ParamLayout, held: ParamLayout) -> str | None:
    if held.dtype != mine.dtype:
        return f"dtype {held.dtype} on the source, {mine.dtype} here"
    if held.logical_shape != mine.logical_shape:
        return f"logical shape {list(held.logical_shape)} on the source, {list(mine.logical_shape)} here"
    if held.dim != mine.dim:
        return f"split along dim {_dim(held.dim)} on the source, {_dim(mine.dim)} here"
    return None


def _take(
    need: Need, held: ParamLayout, uncovered: list[tuple[int, int]], out: list[SliceRequest]
) -> list[tuple[int, int]]:
    """Ask `held`'s source for what it has of `uncovered`; returns what is still uncovered."""
    if need.dim is None:  # replicated on both sides
        out.append(SliceRequest(need.name, None, 0, 0, need.logical.length))
        return []
    dim = need.dim
    for seg, source_local in held.placed():
        for a, b in list(uncovered):
            lo, hi = max(a, seg.start), min(b, seg.stop)
            if lo >= hi:
                continue
            out.append(
                SliceRequest(
                    need.name,
                    dim,
                    source_local + lo - seg.start,
                    need.client_start + lo - need.logical.start,
                    hi - lo,
                )
            )
            uncovered = _subtract(uncovered, lo, hi)
    return uncovered


def _subtract(runs: list[tuple[int, int]], lo: int, hi: int) -> list[tuple[int, int]]:
    out = []
    for a, b in runs:
        if hi <= a or b <= lo:
            out.append((a, b))
            continue
        if a < lo:
            out.append((a, lo))
        if hi < b:
            out.append((hi, b))
    return out


def _merged(requests: list[SliceRequest]) -> list[SliceRequest]:
    """Join requests that continue each other on both sides (fewer, larger pieces)."""
    out: list[SliceRequest] = []
    for r in requests:
        last = out[-1] if out else None
        if (
            last is not None
            and r.dim is not None
            and (last.name, last.dim) == (r.name, r.dim)
            and last.source_start + last.length == r.source_start
            and last.client_start + last.length == r.client_start
        ):
            out[-1] = SliceRequest(r.name, r.dim, last.source_start, last.client_start, last.length + r.length)
        else:
            out.append(r)
    return out
