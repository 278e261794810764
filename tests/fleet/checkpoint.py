"""A synthetic checkpoint for fleet runs: many tensors, deterministic, any size.

Per "layer": four 2-MiB float32 matrices (sent as direct buckets) and a few small
tensors (packed together). Clients allocate the same shapes empty and receive into them.
"""

from __future__ import annotations

import hashlib

import torch

MIB = 1 << 20
_MATRIX = (512, 1024)  # 2 MiB of float32
_LAYER_BYTES = 4 * 2 * MIB


def layout(size_mib: int) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    layers = max(1, (size_mib * MIB) // _LAYER_BYTES)
    out: list[tuple[str, tuple[int, ...], torch.dtype]] = [
        ("embed.weight", (1000, 64), torch.float32)
    ]
    for i in range(layers):
        for part in ("q", "k", "v", "o"):
            out.append((f"layers.{i}.{part}.weight", _MATRIX, torch.float32))
        out.append((f"layers.{i}.norm.weight", (1024,), torch.float32))
        out.append((f"layers.{i}.o.bias", (512,), torch.bfloat16))
    out.append(("final_norm.weight", (1024,), torch.float32))
    return out


def make_reference(size_mib: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(shape, generator=g).to(dtype) for name, shape, dtype in layout(size_mib)
    }


def make_empty(size_mib: int) -> dict[str, torch.Tensor]:
    return {name: torch.zeros(shape, dtype=dtype) for name, shape, dtype in layout(size_mib)}


def content_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names and bytes, in order: equal digests = bit-identical tensors."""
    h = hashlib.sha256()
    for name, t in tensors.items():
        h.update(name.encode())
        h.update(memoryview(t.contiguous().view(torch.uint8).reshape(-1).numpy()))
    return h.hexdigest()


def total_bytes(size_mib: int) -> int:
    return sum(torch.Size(shape).numel() * dtype.itemsize for _, shape, dtype in layout(size_mib))
