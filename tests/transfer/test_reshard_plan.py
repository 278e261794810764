"""The resharding arithmetic against slicing the full tensors: whatever the shapes on both
sides (TP 1..8, KV heads replicated, a padded vocabulary, pipeline stages), applying the
plan fills the client's shard exactly, and asks for no byte it does not keep."""

import math

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from loader.transfer.buckets import byte_view, copy_bytes
from loader.transfer.layout import ParamLayout, Segment, ShardLayout
from loader.transfer.pieces import piece_views, write_bytes
from loader.transfer.reshard_plan import (
    SliceRequest,
    client_needs,
    plan_reshard,
    remaining_needs,
)
from tests.transfer.sharded_model import ModelSpec, full_weights, shard


@st.composite
def shapes(draw, sides: int = 2):
    """(spec, tp of each side): a model that both TPs can shard, KV heads replicated or
    split, the vocabulary padded."""
    tps = [draw(st.integers(1, 8)) for _ in range(sides)]
    unit = math.lcm(*tps)
    heads = unit * draw(st.integers(1, 2))
    kv_choices = [k for k in range(1, heads + 1)
                  if heads % k == 0 and all(k % tp == 0 or tp % k == 0 for tp in tps)]
    spec = ModelSpec(
        layers=draw(st.integers(1, 3)),
        heads=heads,
        kv_heads=draw(st.sampled_from(kv_choices)),
        head_dim=draw(st.sampled_from([1, 2, 3])),
        intermediate=unit * draw(st.integers(1, 3)),
        vocab=draw(st.integers(1, 130)),
        pad=unit * draw(st.sampled_from([1, 2, 8])),
        tied=draw(st.booleans()),
        qkv_bias=draw(st.booleans()),
        seed=draw(st.integers(0, 3)),
    )
    return spec, tps


def apply(plan, sources: dict[str, dict], client: dict[str, torch.Tensor]) -> int:
    """Copy each requested slice from its source into the client, as the transfer does
    (the source's row-major bytes, written back run by run). Returns the bytes moved."""
    moved = 0
    for source, requests in plan.requests.items():
        theirs = piece_views(sources[source], requests, at_source=True)
        mine = piece_views(client, requests, at_source=False)
        for r in requests:
            data = byte_view(theirs[r.piece_name].contiguous())
            half = data.numel() // 2 // 4 * 4  # in two pieces, as a bucket split would
            write_bytes(mine[r.piece_name], 0, data[:half], copy_bytes)
            write_bytes(mine[r.piece_name], half, data[half:], copy_bytes)
            moved += data.numel()
    return moved


def _sources(spec, full, tp, pp):
    out = {}
    for rank in range(tp * pp):
        tensors, layout = shard(spec, full, tp, pp, rank)
        out[f"s{rank}"] = (tensors, layout)
    return out


@settings(max_examples=60, deadline=None)
@given(shape=shapes(), source_pp=st.integers(1, 3), client_pp=st.integers(1, 2), data=st.data())
def test_plan_fills_the_client_shard_exactly(shape, source_pp, client_pp, data):
    spec, (source_tp, client_tp) = shape
    assume(source_pp <= spec.layers and client_pp <= spec.layers)
    full = full_weights(spec)
    sources = _sources(spec, full, source_tp, source_pp)
    order = data.draw(st.permutations(sorted(sources)))
    client_rank = data.draw(st.integers(0, client_tp * client_pp - 1))
    expected, layout = shard(spec, full, client_tp, client_pp, client_rank)
    plan = plan_reshard(layout, client_needs(layout), [(s, sources[s][1]) for s in order])
    assert plan.complete, plan.missing
    client = {name: torch.zeros_like(t) for name, t in expected.items()}
    moved = apply(plan, {s: t for s, (t, _) in sources.items()}, client)
    for name, t in expected.items():
        assert torch.equal(client[name], t), name
    assert moved == sum(t.numel() * t.element_size() for t in expected.values())


@settings(max_examples=30, deadline=None)
@given(shape=shapes(), data=st.data())
def test_a_failed_source_is_replanned_over_the_others(shape, data):
    """What a failed source owed goes to the other holders; delivered slices are not asked again."""
    spec, (source_tp, client_tp) = shape
    full = full_weights(spec)
    one, two = _sources(spec, full, source_tp, 1), _sources(spec, full, source_tp, 1)
    sources = {**{f"a{k}": v for k, v in one.items()}, **{f"b{k}": v for k, v in two.items()}}
    expected, layout = shard(spec, full, client_tp, 1, data.draw(st.integers(0, client_tp - 1)))
    needs = client_needs(layout)
    known = [(s, v[1]) for s, v in sources.items()]
    first = plan_reshard(layout, needs, known)
    failed = data.draw(st.sampled_from(sorted(first.requests)))
    delivered = [r for s, rs in first.requests.items() if s != failed for r in rs]
    rest = remaining_needs(needs, delivered)
    second = plan_reshard(layout, rest, [(s, v) for s, v in known if s != failed])
    assert second.complete and failed not in second.requests
    client = {name: torch.zeros_like(t) for name, t in expected.items()}
    tensors = {s: t for s, (t, _) in sources.items()}
    delivered_plan = type(first)({s: rs for s, rs in first.requests.items() if s != failed})
    moved = apply(delivered_plan, tensors, client) + apply(second, tensors, client)
    for name, t in expected.items():
        assert torch.equal(client[name], t), name
    assert moved == sum(t.numel() * t.element_size() for t in expected.values())


def test_same_shape_asks_one_source_for_everything_in_whole_pieces():
    spec = ModelSpec()
    full = full_weights(spec)
    sources = _sources(spec, full, 2, 1)
    _, layout = shard(spec, full, 2, 1, 1)
    plan = plan_reshard(layout, client_needs(layout), [(s, sources[s][1]) for s in ("s1", "s0")])
    assert list(plan.requests) == ["s1"]
    assert len(plan.requests["s1"]) == len(layout.params)  # one piece per tensor


def test_tp2_to_tp1_splits_the_fused_qkv_per_component():
    spec = ModelSpec(layers=1, heads=4, kv_heads=2)
    full = full_weights(spec)
    sources = _sources(spec, full, 2, 1)
    _, layout = shard(spec, full, 1, 1, 0)
    plan = plan_reshard(layout, client_needs(layout), [(s, v[1]) for s, v in sources.items()])
    qkv = [r for r in plan.requests["s1"] if r.name.endswith("qkv_proj.weight")]
    hd = spec.head_dim
    # rank 1 holds query heads 2-3 and KV head 1: three runs, each to its own place
    assert [(r.source_start, r.client_start, r.length) for r in qkv] == [
        (0, 2 * hd, 2 * hd), (2 * hd, 5 * hd, hd), (3 * hd, 7 * hd, hd)
    ]


def test_replicated_kv_heads_are_asked_once():
    spec = ModelSpec(layers=1, heads=8, kv_heads=2)  # TP 8: four ranks share each KV head
    full = full_weights(spec)
    sources = _sources(spec, full, 8, 1)
    _, layout = shard(spec, full, 1, 1, 0)
    plan = plan_reshard(layout, client_needs(layout), [(s, v[1]) for s, v in sources.items()])
    kv = [(s, r) for s, rs in plan.requests.items() for r in rs
          if r.name.endswith("qkv_proj.weight") and r.client_start >= 8 * spec.head_dim]
    kv.sort(key=lambda item: item[1].client_start)
    assert [s for s, _ in kv] == ["s0", "s4", "s0", "s4"]  # k0 k1 v0 v1, each from its first holder


def test_uncovered_parameter_is_named():
    spec = ModelSpec(layers=2)
    full = full_weights(spec)
    _, layout = shard(spec, full, 1, 1, 0)
    _, stage0 = shard(spec, full, 1, 2, 0)  # only the first pipeline stage answers
    plan = plan_reshard(layout, client_needs(layout), [("s0", stage0)])
    assert not plan.complete
    assert plan.missing[0][0] == "model.layers.1.self_attn.qkv_proj.weight"
    assert "held by no source" in plan.missing[0][1]


def test_a_source_with_another_logical_shape_or_dtype_is_not_used():
    mine = ShardLayout("c", 1, 1, 0, (ParamLayout.split("w", "float32", (8, 4), 0, [Segment(0, 8)]),))
    other = ShardLayout("c", 2, 1, 0, (ParamLayout.split("w", "float32", (10, 4), 0, [Segment(0, 5)]),))
    bf16 = ShardLayout("c", 2, 1, 0, (ParamLayout.split("w", "bfloat16", (8, 4), 0, [Segment(0, 4)]),))
    plan = plan_reshard(mine, client_needs(mine), [("x", other), ("y", bf16)])
    assert plan.missing == [("w", "dtype bfloat16 on the source, float32 here (dim 0: 0..8)")]


def test_slice_request_wire_is_validated():
    r = SliceRequest("a.weight", 1, 4, 9, 12)
    assert SliceRequest.from_wire(r.to_wire()) == SliceRequest("a.weight", 1, 4, 0, 12)
    for bad in (["a", 1, 4], ["", 0, 0, 1], ["a", -2, 0, 1], ["a", 0, -1, 1], ["a", 0, 0, 0],
                ["a", True, 0, 1], [1, 0, 0, 1]):
        try:
            SliceRequest.from_wire(bad)
        except ValueError:
            continue
        raise AssertionError(f"accepted {bad}")
