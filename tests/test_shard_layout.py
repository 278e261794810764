"""The layouts loader.integration.shard_layout reads off vLLM's layers, checked against
vLLM itself: each layer is built for every rank of a TP group and loaded from full
checkpoint tensors with its own weight loader; the description must say exactly which
slices of the logical tensor the rank then holds (KV heads replicated or split, fused
components, vocabulary padding), and what it cannot describe."""

from __future__ import annotations

import math
import types
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loader.integration.shard_layout import describe, shard_layout

linear = pytest.importorskip("vllm.model_executor.layers.linear")
vocab_mod = pytest.importorskip("vllm.model_executor.layers.vocab_parallel_embedding")
parallel_state = pytest.importorskip("vllm.distributed.parallel_state")
layernorm = pytest.importorskip("vllm.model_executor.layers.layernorm")


def built(tp: int, rank: int, make):
    group = types.SimpleNamespace(rank_in_group=rank, world_size=tp)
    with mock.patch.object(parallel_state, "get_tp_group", return_value=group):
        return make()


def holds(layout, logical: torch.Tensor) -> torch.Tensor:
    """What a rank with `layout` must hold: its segments of the logical tensor, in order."""
    if layout.dim is None:
        return logical
    return torch.cat([logical.narrow(layout.dim, s.start, s.length) for s in layout.segments], layout.dim)


def check(module, name: str, logical: torch.Tensor) -> None:
    param = getattr(module, name)
    layout = describe(module, name, param, name)
    assert layout.logical_shape == tuple(logical.shape)
    assert layout.local_shape == tuple(param.shape)
    assert torch.equal(param.data, holds(layout, logical)), (type(module).__name__, name)


@st.composite
def attention(draw):
    tp = draw(st.sampled_from([1, 2, 4, 8]))
    heads = tp * draw(st.integers(1, 2))
    kv = draw(st.sampled_from([k for k in range(1, heads + 1)
                               if heads % k == 0 and (k % tp == 0 or tp % k == 0)]))
    return tp, heads, kv, draw(st.sampled_from([2, 4]))


@settings(max_examples=20, deadline=None)
@given(shape=attention(), seed=st.integers(0, 5))
def test_qkv_with_split_or_replicated_kv_heads(shape, seed):
    tp, heads, kv, head = shape
    hidden = 8
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(n * head, hidden, generator=g) for n in (heads, kv, kv))
    qb, kb, vb = (torch.randn(n * head, generator=g) for n in (heads, kv, kv))
    for rank in range(tp):
        layer = built(tp, rank, lambda: linear.QKVParallelLinear(hidden, head, heads, kv, bias=True))
        for shard_id, w, b in (("q", q, qb), ("k", k, kb), ("v", v, vb)):
            layer.weight.weight_loader(layer.weight, w, shard_id)
            layer.bias.weight_loader(layer.bias, b, shard_id)
        check(layer, "weight", torch.cat([q, k, v]))
        check(layer, "bias", torch.cat([qb, kb, vb]))


@settings(max_examples=10, deadline=None)
@given(tp=st.sampled_from([1, 2, 4, 8]), parts=st.integers(1, 3), seed=st.integers(0, 5))
def test_merged_column_row_and_column(tp, parts, seed):
    g = torch.Generator().manual_seed(seed)
    inner, hidden = 8 * parts, 16
    gate, up = torch.randn(inner, hidden, generator=g), torch.randn(inner, hidden, generator=g)
    down, bias = torch.randn(hidden, inner, generator=g), torch.randn(hidden, generator=g)
    col = torch.randn(inner, hidden, generator=g)
    for rank in range(tp):
        merged = built(tp, rank, lambda: linear.MergedColumnParallelLinear(hidden, [inner, inner], bias=False))
        merged.weight.weight_loader(merged.weight, gate, 0)
        merged.weight.weight_loader(merged.weight, up, 1)
        check(merged, "weight", torch.cat([gate, up]))
        row = built(tp, rank, lambda: linear.RowParallelLinear(inner, hidden, bias=True))
        row.weight.weight_loader(row.weight, down)
        row.bias.weight_loader(row.bias, bias)
        check(row, "weight", down)
        check(row, "bias", bias)  # whole on every rank
        column = built(tp, rank, lambda: linear.ColumnParallelLinear(hidden, inner, bias=False))
        column.weight.weight_loader(column.weight, col)
        check(column, "weight", col)


@settings(max_examples=15, deadline=None)
@given(tp=st.sampled_from([1, 2, 4, 8]), vocab=st.integers(1, 300), seed=st.integers(0, 5))
def test_vocabulary_with_padding(tp, vocab, seed):
    dim = 8
    weights = torch.randn(vocab, dim, generator=torch.Generator().manual_seed(seed))
    padded = math.ceil(vocab / 64) * 64
    logical = torch.cat([weights, torch.zeros(padded - vocab, dim)])
    for rank in range(tp):
        for cls in (vocab_mod.VocabParallelEmbedding, vocab_mod.ParallelLMHead):
            layer = built(tp, rank, lambda cls=cls: cls(vocab, dim))
            layer.weight.data.fill_(float("nan"))  # the loader must write every row
            layer.weight.weight_loader(layer.weight, weights)
            check(layer, "weight", logical)


class _Custom(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.sinks = torch.nn.Parameter(torch.zeros(4))


def test_what_cannot_be_described_is_named_with_the_reason():
    class Subclass(linear.RowParallelLinear):
        pass

    class FakeQuant:
        pass

    from vllm.config import VllmConfig, set_current_vllm_config

    model = torch.nn.Module()
    with set_current_vllm_config(VllmConfig()):
        model.norm = layernorm.RMSNorm(8)
    model.custom = _Custom()
    model.sub = built(2, 0, lambda: Subclass(8, 4, bias=False))
    model.quant = built(2, 1, lambda: linear.ColumnParallelLinear(4, 8, bias=False))
    model.quant.quant_method = FakeQuant()
    names = [n for n, _ in model.named_parameters()]
    layout = shard_layout(model, names, "c" * 64, 2, 1, 0)
    assert [p.name for p in layout.params] == ["norm.weight"]
    reasons = dict(layout.unsupported)
    assert reasons["custom.sinks"] == "layer _Custom (sinks) has no known partition"
    assert reasons["sub.weight"] == "layer Subclass (weight) has no known partition"
    assert reasons["quant.weight"] == "quantized ColumnParallelLinear (FakeQuant)"
