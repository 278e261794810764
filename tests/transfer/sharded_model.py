"""A decoder's weights sharded as vLLM shards them, without vLLM: full logical tensors, and
each (tp, pp, rank)'s local tensors with their ShardLayout. The tests check the resharding
arithmetic against it; tests/test_shard_layout.py checks the same rules against vLLM's
own layers and weight loaders."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loader.transfer.layout import ParamLayout, Segment, ShardLayout

CONTENT = "c0" * 32


@dataclass(frozen=True)
class ModelSpec:
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 8
    intermediate: int = 48
    vocab: int = 100  # padded to a multiple of `pad` in the logical tensor
    pad: int = 64
    tied: bool = True
    qkv_bias: bool = True
    dtype: torch.dtype = torch.float32
    seed: int = 0

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim

    @property
    def padded_vocab(self) -> int:
        return -(-self.vocab // self.pad) * self.pad

    def fits(self, tp: int) -> bool:
        kv_ok = self.kv_heads % tp == 0 or tp % self.kv_heads == 0
        return (
            self.heads % tp == 0 and kv_ok and self.intermediate % tp == 0
            and self.padded_vocab % tp == 0 and self.hidden % tp == 0
        )


def full_weights(spec: ModelSpec) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(spec.seed)
    h, hd = spec.hidden, spec.head_dim
    qkv_rows = (spec.heads + 2 * spec.kv_heads) * hd

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(spec.dtype)

    embed = rand(spec.padded_vocab, h)
    embed[spec.vocab :] = 0  # vLLM zero-fills the padding rows
    out = {"model.embed_tokens.weight": embed}
    for i in range(spec.layers):
        p = f"model.layers.{i}."
        out[p + "self_attn.qkv_proj.weight"] = rand(qkv_rows, h)
        if spec.qkv_bias:
            out[p + "self_attn.qkv_proj.bias"] = rand(qkv_rows)
        out[p + "self_attn.o_proj.weight"] = rand(h, spec.heads * hd)
        out[p + "mlp.gate_up_proj.weight"] = rand(2 * spec.intermediate, h)
        out[p + "mlp.down_proj.weight"] = rand(h, spec.intermediate)
        out[p + "input_layernorm.weight"] = rand(h)
    out["model.norm.weight"] = rand(h)
    if not spec.tied:
        lm = rand(spec.padded_vocab, h)
        lm[spec.vocab :] = 0
        out["lm_head.weight"] = lm
    return out


def _runs(name: str, spec: ModelSpec, tp: int, r: int) -> tuple[int | None, list[tuple[int, int]]]:
    """(split dim, [(logical start, length)]) of parameter `name` on tp rank r."""
    hd = spec.head_dim
    if name.endswith(("layernorm.weight", "norm.weight")):
        return None, []
    if "qkv_proj" in name:
        q, k = spec.heads * hd, spec.kv_heads * hd
        local_q = q // tp
        replicas = max(1, tp // spec.kv_heads)
        local_kv = max(1, spec.kv_heads // tp) * hd
        group = r // replicas
        return 0, [(r * local_q, local_q), (q + group * local_kv, local_kv), (q + k + group * local_kv, local_kv)]
    if "o_proj" in name or "down_proj" in name:
        extent = spec.heads * hd if "o_proj" in name else spec.intermediate
        return 1, [(r * extent // tp, extent // tp)]
    if "gate_up" in name:
        part = spec.intermediate // tp
        return 0, [(r * part, part), (spec.intermediate + r * part, part)]
    part = spec.padded_vocab // tp  # embed_tokens, lm_head
    return 0, [(r * part, part)]


def layers_of(spec: ModelSpec, pp: int, pp_rank: int) -> range:
    """The layers a pipeline stage holds (contiguous, the first stages one more)."""
    base, extra = divmod(spec.layers, pp)
    start = pp_rank * base + min(pp_rank, extra)
    return range(start, start + base + (1 if pp_rank < extra else 0))


def _held(name: str, spec: ModelSpec, pp: int, pp_rank: int) -> bool:
    if ".layers." in name:
        return int(name.split(".layers.")[1].split(".")[0]) in layers_of(spec, pp, pp_rank)
    if "embed_tokens" in name:
        return pp_rank == 0 or (spec.tied and pp_rank == pp - 1)
    return pp_rank == pp - 1  # final norm, lm_head


def shard(
    spec: ModelSpec, full: dict[str, torch.Tensor], tp: int, pp: int, rank: int
) -> tuple[dict[str, torch.Tensor], ShardLayout]:
    """Global `rank` (= pp_rank * tp + tp_rank): its local tensors and its layout."""
    pp_rank, tp_rank = divmod(rank, tp)
    tensors, params = {}, []
    for name, logical in full.items():
        if not _held(name, spec, pp, pp_rank):
            continue
        dim, runs = _runs(name, spec, tp, tp_rank)
        dtype = str(logical.dtype).removeprefix("torch.")
        if dim is None:
            tensors[name] = logical.clone()
            params.append(ParamLayout(name, dtype, tuple(logical.shape)))
            continue
        tensors[name] = torch.cat([logical.narrow(dim, a, n) for a, n in runs], dim).contiguous()
        params.append(
            ParamLayout.split(name, dtype, tuple(logical.shape), dim, [Segment(a, n) for a, n in runs])
        )
    return tensors, ShardLayout(CONTENT, tp, pp, rank, tuple(params))
