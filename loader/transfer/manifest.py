"""Manifest: names, shapes, dtypes and byte sizes of the tensors a transfer moves.

Both sides build one from their tensors and compare before any data moves. Names that
share storage (tied weights) are recorded as aliases and their bytes are sent once.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import orjson
import torch

MAX_TENSORS = 1_000_000
MAX_NAME_LEN = 1024
MAX_DIMS = 16


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class Manifest:
    specs: tuple[TensorSpec, ...]
    aliases: tuple[tuple[str, str], ...] = ()  # (alias name, name it shares storage with)

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.specs)

    def to_wire(self) -> dict:
        return {
            "tensors": [[s.name, s.dtype, list(s.shape), s.nbytes] for s in self.specs],
            "aliases": [list(a) for a in self.aliases],
        }

    def digest(self) -> str:
        return hashlib.sha256(orjson.dumps(self.to_wire())).hexdigest()

    @classmethod
    def from_wire(cls, obj) -> Manifest:
        """Validate an untrusted manifest; ValueError on any malformed field."""
        if not isinstance(obj, dict) or set(obj) != {"tensors", "aliases"}:
            raise ValueError("manifest: expected an object with 'tensors' and 'aliases'")
        tensors = bounded_list("manifest.tensors", obj["tensors"])
        aliases = bounded_list("manifest.aliases", obj["aliases"])
        specs = tuple(_spec_from_wire(i, item) for i, item in enumerate(tensors))
        return cls(specs, name_pairs("manifest.aliases", aliases, "[alias, target]"))

    def first_difference(self, other: Manifest) -> str | None:
        """None when equal, else a reason naming the first differing tensor.

        `self` is the local manifest, `other` the remote one."""
        for mine, theirs in zip(self.specs, other.specs, strict=False):
            if mine.name != theirs.name:
                return f"tensor {mine.name!r}: source has {theirs.name!r} at this position"
            for attr in ("dtype", "shape", "nbytes"):
                a, b = getattr(mine, attr), getattr(theirs, attr)
                if a != b:
                    return f"tensor {mine.name!r}: {attr} differs (local {a}, source {b})"
        if len(self.specs) > len(other.specs):
            return f"tensor {self.specs[len(other.specs)].name!r}: missing on source"
        if len(other.specs) > len(self.specs):
            return f"tensor {other.specs[len(self.specs)].name!r}: not expected locally"
        if self.aliases != other.aliases:
            mine, theirs = dict(self.aliases), dict(other.aliases)
            for name in sorted(set(mine) | set(theirs)):
                if mine.get(name) != theirs.get(name):
                    return (
                        f"tensor {name!r}: tied to {mine.get(name)!r} locally, "
                        f"{theirs.get(name)!r} on source"
                    )
        return None


def unique_tensors(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list]:
    """Split into tensors with their own storage and (alias, target) pairs of exact views."""
    unique: dict[str, torch.Tensor] = {}
    aliases: list[tuple[str, str]] = []
    seen: dict[tuple, str] = {}
    for name, t in tensors.items():
        key = (
            t.device,
            t.untyped_storage().data_ptr(),
            t.storage_offset(),
            tuple(t.shape),
            tuple(t.stride()),
            t.dtype,
        )
        if t.numel() > 0 and key in seen:
            aliases.append((name, seen[key]))
            continue
        seen[key] = name
        unique[name] = t
    return unique, aliases


def build_manifest(tensors: dict[str, torch.Tensor]) -> Manifest:
    unique, aliases = unique_tensors(tensors)
    specs = tuple(
        TensorSpec(name, dtype_name(t.dtype), tuple(t.shape), t.numel() * t.element_size())
        for name, t in unique.items()
    )
    return Manifest(specs, tuple(aliases))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _valid_name(x) -> bool:
    return isinstance(x, str) and 0 < len(x) <= MAX_NAME_LEN


def bounded_list(where: str, value) -> list:
    """`value` if it is a list of at most MAX_TENSORS items (untrusted wire input)."""
    if not isinstance(value, list) or len(value) > MAX_TENSORS:
        raise ValueError(f"{where}: expected a list of bounded length")
    return value


def name_pairs(where: str, items: list, expected: str) -> tuple[tuple[str, str], ...]:
    """`items` as pairs of names (each a non-empty string of at most MAX_NAME_LEN)."""
    for i, item in enumerate(items):
        if not isinstance(item, list) or len(item) != 2 or not all(map(_valid_name, item)):
            raise ValueError(f"{where}[{i}]: expected {expected}")
    return tuple((a, b) for a, b in items)


def _spec_from_wire(i: int, item) -> TensorSpec:
    where = f"manifest.tensors[{i}]"
    if not isinstance(item, list) or len(item) != 4:
        raise ValueError(f"{where}: expected [name, dtype, shape, nbytes]")
    name, dtype, shape, nbytes = item
    if not _valid_name(name):
        raise ValueError(f"{where}: bad name")
    if not isinstance(dtype, str) or not 0 < len(dtype) <= 32:
        raise ValueError(f"{where}: bad dtype")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise ValueError(f"{where}: bad shape")
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or not 0 <= nbytes < 1 << 48:
        raise ValueError(f"{where}: bad nbytes")
    return TensorSpec(name, dtype, tuple(shape), nbytes)
