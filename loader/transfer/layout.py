"""How a rank's local tensors map onto the logical (unsharded) ones: a plain description
the transfer engine understands without vLLM (loader.integration.shard_layout derives it
from vLLM's layers).

A parameter is either replicated (its local tensor is the logical one) or split along one
dimension: its local tensor is the concatenation, along that dimension, of segments of
the logical tensor. A plain column-parallel weight has one segment per rank; a fused one
(QKV, gate/up) one per packed component; replicated KV heads give several ranks the same
segment; a padded vocabulary is a logical tensor with the padding rows in it.

A rank that cannot describe a parameter (quantized packed formats, custom layers) lists
it in `unsupported` with the reason: nobody reshards from or into it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import orjson

from loader.transfer.manifest import MAX_DIMS, MAX_NAME_LEN, bounded_list, name_pairs

MAX_SEGMENTS = 64  # per parameter: a fused layer has a handful of components
MAX_REASON = 200
_MAX_EXTENT = 1 << 48


@dataclass(frozen=True)
class Segment:
    """`length` positions of the logical tensor from `start`, along the split dimension."""

    start: int
    length: int

    @property
    def stop(self) -> int:
        return self.start + self.length


@dataclass(frozen=True)
class ParamLayout:
    name: str
    dtype: str
    logical_shape: tuple[int, ...]
    dim: int | None = None  # None: replicated (local tensor == logical tensor)
    segments: tuple[Segment, ...] = ()  # in local order along `dim`

    @classmethod
    def split(
        cls, name: str, dtype: str, logical_shape, dim: int, segments
    ) -> ParamLayout:
        """A split parameter, its adjacent segments merged (a TP=1 QKV is one segment)."""
        merged: list[Segment] = []
        for seg in segments:
            if seg.length == 0:
                continue
            if merged and merged[-1].stop == seg.start:
                merged[-1] = Segment(merged[-1].start, merged[-1].length + seg.length)
            else:
                merged.append(seg)
        return cls(name, dtype, tuple(logical_shape), dim, tuple(merged))

    @property
    def local_shape(self) -> tuple[int, ...]:
        if self.dim is None:
            return self.logical_shape
        shape = list(self.logical_shape)
        shape[self.dim] = sum(s.length for s in self.segments)
        return tuple(shape)

    def placed(self) -> list[tuple[Segment, int]]:
        """(segment, where it starts in the local tensor along `dim`) for each segment;
        a replicated parameter is one segment over dimension 0 (or the whole scalar)."""
        if self.dim is None:
            extent = self.logical_shape[0] if self.logical_shape else 1
            return [(Segment(0, extent), 0)]
        out, local = [], 0
        for seg in self.segments:
            out.append((seg, local))
            local += seg.length
        return out

    def validate(self) -> None:
        where = f"layout of {self.name!r}"
        if not 0 < len(self.name) <= MAX_NAME_LEN:
            raise ValueError(f"{where}: bad name")
        if len(self.logical_shape) > MAX_DIMS or any(d < 0 or d >= _MAX_EXTENT for d in self.logical_shape):
            raise ValueError(f"{where}: bad logical shape {self.logical_shape}")
        if self.dim is None:
            if self.segments:
                raise ValueError(f"{where}: a replicated parameter has no segments")
            return
        if not 0 <= self.dim < len(self.logical_shape):
            raise ValueError(f"{where}: split dimension {self.dim} outside its shape")
        if not 0 < len(self.segments) <= MAX_SEGMENTS:
            raise ValueError(f"{where}: expected 1..{MAX_SEGMENTS} segments")
        extent = self.logical_shape[self.dim]
        for seg in self.segments:
            if seg.start < 0 or seg.length <= 0 or seg.stop > extent:
                raise ValueError(f"{where}: segment {seg.start}+{seg.length} outside 0..{extent}")


@dataclass(frozen=True)
class ShardLayout:
    """One rank's description: what it holds (`params`, by the names it serves) and what
    it cannot describe (`unsupported`: name, why)."""

    content: str  # layout-independent content id of the weights
    tp: int
    pp: int
    rank: int
    params: tuple[ParamLayout, ...]
    unsupported: tuple[tuple[str, str], ...] = ()

    def by_name(self) -> dict[str, ParamLayout]:
        return {p.name: p for p in self.params}

    def to_wire(self) -> dict:
        return {
            "content": self.content,
            "tp": self.tp,
            "pp": self.pp,
            "rank": self.rank,
            "params": [
                [p.name, p.dtype, list(p.logical_shape), -1 if p.dim is None else p.dim,
                 [[s.start, s.length] for s in p.segments]]
                for p in self.params
            ],
            "unsupported": [list(u) for u in self.unsupported],
        }

    def digest(self) -> str:
        return hashlib.sha256(orjson.dumps(self.to_wire())).hexdigest()

    @classmethod
    def from_wire(cls, obj) -> ShardLayout:
        """Validate an untrusted layout; ValueError naming the bad field."""
        keys = {"content", "tp", "pp", "rank", "params", "unsupported"}
        if not isinstance(obj, dict) or set(obj) != keys:
            raise ValueError(f"layout: expected an object with {sorted(keys)}")
        content = obj["content"]
        if not isinstance(content, str) or not 0 < len(content) <= 128:
            raise ValueError("layout.content: expected a content id")
        tp, pp, rank = (_count(f"layout.{k}", obj[k], 0, 1 << 20) for k in ("tp", "pp", "rank"))
        if tp < 1 or pp < 1:
            raise ValueError("layout.tp/pp: expected at least 1")
        params = bounded_list("layout.params", obj["params"])
        unsupported = bounded_list("layout.unsupported", obj["unsupported"])
        parsed = tuple(_param_from_wire(i, item) for i, item in enumerate(params))
        if len({p.name for p in parsed}) != len(parsed):
            raise ValueError("layout.params: a name appears twice")
        pairs = name_pairs("layout.unsupported", unsupported, "[name, reason]")
        return cls(content, tp, pp, rank, parsed,
                   tuple((name, reason[:MAX_REASON]) for name, reason in pairs))


def _count(name: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name}: expected an integer in {lo}..{hi}")
    return value


def _param_from_wire(i: int, item) -> ParamLayout:
    where = f"layout.params[{i}]"
    if not isinstance(item, list) or len(item) != 5:
        raise ValueError(f"{where}: expected [name, dtype, shape, dim, segments]")
    name, dtype, shape, dim, segments = item
    if not isinstance(name, str) or not isinstance(dtype, str) or not 0 < len(dtype) <= 32:
        raise ValueError(f"{where}: bad name or dtype")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS:
        raise ValueError(f"{where}: bad shape")
    shape = tuple(_count(f"{where}.shape[]", d, 0, _MAX_EXTENT - 1) for d in shape)
    dim = _count(f"{where}.dim", dim, -1, MAX_DIMS)
    if not isinstance(segments, list) or len(segments) > MAX_SEGMENTS:
        raise ValueError(f"{where}.segments: expected at most {MAX_SEGMENTS}")
    segs = []
    for pair in segments:
        if not isinstance(pair, list) or len(pair) != 2:
            raise ValueError(f"{where}.segments: expected [start, length] pairs")
        segs.append(Segment(*(_count(f"{where}.segments[]", x, 0, _MAX_EXTENT) for x in pair)))
    layout = ParamLayout(name, dtype, shape, None if dim == -1 else dim, tuple(segs))
    layout.validate()
    return layout
