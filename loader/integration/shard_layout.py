"""This rank's ShardLayout (loader.transfer.layout): how each served parameter maps onto
the logical, unsharded one, read from what vLLM's layers say about their partition.

No per-model table: a parameter is described by its layer's class and the attributes
vLLM sets on the layer (tp_rank, tp_size, output and input sizes, heads and KV-head
replicas, the vocabulary's shard indices) and on the parameter (output_dim, input_dim,
packed_dim). Only exact, unquantized classes are described; a subclass (custom or
out-of-tree layer), a quantized method or packed parameter, and a layer class unknown
here are listed as unsupported with the reason.
"""

from __future__ import annotations

import torch
from torch import nn

from loader.integration.vllm_compat import layer_class
from loader.transfer.layout import ParamLayout, Segment, ShardLayout
from loader.transfer.manifest import dtype_name

_REPLICATED = ("RMSNorm", "GemmaRMSNorm", "LayerNorm", "ReplicatedLinear")
_LINEAR = ("QKVParallelLinear", "MergedColumnParallelLinear", "ColumnParallelLinear",
           "RowParallelLinear", "ReplicatedLinear")
_VOCAB = ("VocabParallelEmbedding", "ParallelLMHead")


class Unsupported(Exception):
    """This parameter cannot be described; the message says why."""


def shard_layout(
    model: nn.Module, names: list[str], content: str, tp: int, pp: int, rank: int
) -> ShardLayout:
    """The layout of the parameters `names` (the served ones) of `model`."""
    owners = _owners(model)
    params, unsupported = [], []
    for name in names:
        module, local_name, param = owners[name]
        try:
            layout = describe(module, local_name, param, name)
        except Unsupported as exc:
            unsupported.append((name, str(exc)))
            continue
        if layout.local_shape != tuple(param.shape):
            unsupported.append(
                (name, f"described as {list(layout.local_shape)}, holds {list(param.shape)}")
            )
            continue
        params.append(layout)
    return ShardLayout(content, tp, pp, rank, tuple(params), tuple(unsupported))


def _owners(model: nn.Module) -> dict[str, tuple[nn.Module, str, torch.Tensor]]:
    owners = {}
    for prefix, module in model.named_modules():
        for local_name, param in module.named_parameters(recurse=False):
            owners.setdefault(f"{prefix}.{local_name}" if prefix else local_name, (module, local_name, param))
    return owners


def describe(module: nn.Module, local_name: str, param: torch.Tensor, name: str) -> ParamLayout:
    kind = _kind(module)
    dtype, shape = dtype_name(param.dtype), tuple(param.shape)
    if getattr(param, "packed_dim", None) is not None:
        raise Unsupported(f"packed parameter (packed_dim {param.packed_dim}) of {kind}")
    if kind in _REPLICATED:
        _check_unquantized(module, kind)
        return ParamLayout(name, dtype, shape)
    if kind in _LINEAR:
        _check_unquantized(module, kind)
        return _linear(module, kind, param, name, dtype, shape)
    if kind in _VOCAB:
        _check_unquantized(module, kind)
        return _vocab(module, param, name, dtype, shape)
    raise Unsupported(f"layer {type(module).__name__} ({local_name}) has no known partition")


def _kind(module: nn.Module) -> str | None:
    """The name of the known class `module` is exactly an instance of, or None."""
    for kind in (*_LINEAR, *_VOCAB, *_REPLICATED):
        cls = layer_class(kind)
        if cls is not None and type(module) is cls:
            return kind
    return None


def _check_unquantized(module: nn.Module, kind: str) -> None:
    method = getattr(module, "quant_method", None)
    if method is None:
        return
    allowed = [layer_class(n) for n in ("UnquantizedLinearMethod", "UnquantizedEmbeddingMethod")]
    if type(method) not in [c for c in allowed if c is not None]:
        raise Unsupported(f"quantized {kind} ({type(method).__name__})")


def _attr(module: nn.Module, name: str) -> int:
    value = getattr(module, name, None)
    if isinstance(value, bool) or not isinstance(value, int):
        raise Unsupported(f"{type(module).__name__} has no integer {name}")
    return value


def _linear(module, kind, param, name, dtype, shape) -> ParamLayout:
    tp_rank, tp_size = _attr(module, "tp_rank"), _attr(module, "tp_size")
    if kind == "RowParallelLinear":
        dim = getattr(param, "input_dim", None)
        if dim is None:  # the bias: added after the all-reduce, whole on every rank
            return ParamLayout(name, dtype, shape)
        part = _attr(module, "input_size_per_partition")
        return _split(name, dtype, shape, dim, _attr(module, "input_size"), [(tp_rank * part, part)])
    dim = getattr(param, "output_dim", None)
    if kind == "ReplicatedLinear" or dim is None:
        return ParamLayout(name, dtype, shape)
    if kind == "QKVParallelLinear":
        return _split(name, dtype, shape, dim, *_qkv_runs(module, tp_rank))
    if kind == "MergedColumnParallelLinear":
        sizes = getattr(module, "output_sizes", None)
        if not isinstance(sizes, list) or not all(isinstance(s, int) for s in sizes):
            raise Unsupported("MergedColumnParallelLinear has no output_sizes")
        runs, offset = [], 0
        for size in sizes:  # each component is split over the ranks on its own
            part = size // tp_size
            runs.append((offset + tp_rank * part, part))
            offset += size
        return _split(name, dtype, shape, dim, offset, runs)
    part = _attr(module, "output_size_per_partition")
    return _split(name, dtype, shape, dim, _attr(module, "output_size"), [(tp_rank * part, part)])


def _qkv_runs(module, tp_rank: int) -> tuple[int, list[tuple[int, int]]]:
    """Logical [q; k; v] of all heads; a rank holds its query heads and the KV heads of
    rank // replicas (several ranks hold the same KV head when TP exceeds their number)."""
    head, v_head = _attr(module, "head_size"), getattr(module, "v_head_size", None) or module.head_size
    heads, kv_heads = _attr(module, "total_num_heads"), _attr(module, "total_num_kv_heads")
    local_heads, local_kv = _attr(module, "num_heads"), _attr(module, "num_kv_heads")
    kv_group = tp_rank // _attr(module, "num_kv_head_replicas")
    q, k = heads * head, kv_heads * head
    runs = [
        (tp_rank * local_heads * head, local_heads * head),
        (q + kv_group * local_kv * head, local_kv * head),
        (q + k + kv_group * local_kv * v_head, local_kv * v_head),
    ]
    return q + k + kv_heads * v_head, runs


def _vocab(module, param, name, dtype, shape) -> ParamLayout:
    """Logical rows: the padded original vocabulary, then the padded added one (LoRA);
    a rank holds its slice of each (padding rows, zero, are part of the logical tensor)."""
    dim = getattr(param, "output_dim", None)
    if dim is None:
        return ParamLayout(name, dtype, shape)
    idx = getattr(module, "shard_indices", None)
    org_padded = _attr(module, "org_vocab_size_padded")
    org_size = _attr(module, "org_vocab_size")
    try:
        org = (idx.padded_org_vocab_start_index, idx.num_org_elements_padded)
        added = (org_padded + idx.padded_added_vocab_start_index - org_size, idx.num_added_elements_padded)
    except AttributeError as exc:
        raise Unsupported(f"{type(module).__name__} shard indices unreadable: {exc}") from None
    return _split(name, dtype, shape, dim, _attr(module, "num_embeddings_padded"), [org, added])


def _split(name, dtype, shape, dim, extent, runs) -> ParamLayout:
    if not 0 <= dim < len(shape):
        raise Unsupported(f"split dimension {dim} outside shape {list(shape)}")
    logical = list(shape)
    logical[dim] = extent
    layout = ParamLayout.split(name, dtype, logical, dim, [Segment(a, n) for a, n in runs])
    try:
        layout.validate()
    except ValueError as exc:
        raise Unsupported(str(exc)) from None
    return layout
