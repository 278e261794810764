"""Keyed per-bucket checksums.

The checksum key is derived from the cluster secret (`checksum_key`), so every member
computes the same checksums for the same bytes (a client resumes from any source, a relay
passes the root's checksums on) and the key never travels. The checksums themselves go
over the authenticated, CURVE-encrypted control channel. Someone who can only touch the
data path (the process group's plaintext TCP/RDMA traffic) has neither key nor
checksums, so cannot make altered bytes match. Without a cluster secret (insecure mode,
static peers without secret_file) the key is public: checksums still catch corruption,
and BLAKE3 still resists forgery, but the device hash does not.

- CPU tensors: "nh32t2-blake3" (loader.transfer.nh_hash): NH over 1 KiB blocks with a
  derived key, then keyed BLAKE3 over the block outputs; reads each byte once at about
  memory speed and releases the GIL, so verification overlaps the next receive. What
  older sources announce is still verified: "nh64-blake3" (the scalar NH of 64-bit
  words) and keyed BLAKE3 over the whole bucket ("blake3-keyed", ~0.25-0.7 CPU-s/GiB,
  about as much as receiving the bytes).
- Accelerator tensors: "mlh31", a keyed multilinear hash computed on the device with
  plain integer tensor ops, so no device-to-host copy of the bucket is needed. Each
  16-bit word m_i is multiplied by a per-position key k_i (< p = 2**31 - 1, derived from
  the checksum key by a splitmix64 mix of the position) and summed mod p, in two
  independent lanes. For any change an attacker makes without knowing the key, both lane
  sums stay equal with probability about 2**-62. Work is done in fixed-size chunks, so the
  temporaries stay a few MiB whatever the bucket size.
"""

from __future__ import annotations

import logging
import threading

import blake3
import torch

BLAKE3_KEYED = "blake3-keyed"
NH32T2_BLAKE3 = "nh32t2-blake3"
NH64_BLAKE3 = "nh64-blake3"
MLH31 = "mlh31"
ALGORITHMS = (NH32T2_BLAKE3, NH64_BLAKE3, BLAKE3_KEYED, MLH31)
KEY_BYTES = 32

_P = (1 << 31) - 1
_CHUNK_WORDS = 1 << 15  # per-row sums stay below 2**62: 2**15 * 2**16 * 2**31
_ROWS_PER_STEP = 32  # 1 Mi words (2 MiB of data, 8 MiB int64 temporaries) per step
_MASK64 = (1 << 64) - 1


_KEY_CONTEXT = "netloader-mesh 2026-11 bucket checksum key v1"
PUBLIC_KEY = bytes(KEY_BYTES)  # without a cluster secret


def checksum_key(cluster_keys) -> bytes:
    """The cluster's checksum key: derived from its CURVE secret (mesh.security.ClusterKeys),
    separated from it by a BLAKE3 key-derivation context; PUBLIC_KEY without one."""
    if cluster_keys is None:
        return PUBLIC_KEY
    return blake3.blake3(cluster_keys.secret, derive_key_context=_KEY_CONTEXT).digest()


def algorithm_for_device(device_type: str) -> str:
    return NH32T2_BLAKE3 if device_type == "cpu" else MLH31


def digest(data: torch.Tensor, algorithm: str, key: bytes) -> str:
    """Keyed checksum of a 1-D uint8 tensor, as a hex string."""
    if data.dtype != torch.uint8 or data.dim() != 1:
        raise ValueError("checksum input must be a 1-D uint8 tensor")
    if len(key) != KEY_BYTES:
        raise ValueError(f"checksum key must be {KEY_BYTES} bytes")
    if algorithm == NH32T2_BLAKE3:
        from loader.transfer.nh_hash import nh32t2_digest

        return nh32t2_digest(_host_bytes(data), key)
    if algorithm == NH64_BLAKE3:
        from loader.transfer.nh_hash import nh64_digest

        return nh64_digest(_host_bytes(data), key)
    if algorithm == BLAKE3_KEYED:
        return blake3.blake3(memoryview(_host_bytes(data)), key=key).hexdigest()
    if algorithm == MLH31:
        return _mlh31(data, key)
    raise ValueError(f"unknown checksum algorithm {algorithm!r}")


GATHERED = (NH32T2_BLAKE3, NH64_BLAKE3, BLAKE3_KEYED)  # what digest_pieces computes


def digest_pieces(pieces: list[torch.Tensor], algorithm: str, key: bytes) -> str:
    """digest() of the concatenation of 1-D uint8 CPU tensors (the items of a packed
    bucket received in their places), without concatenating them. ValueError for an
    algorithm not in GATHERED."""
    if any(p.dtype != torch.uint8 or p.dim() != 1 or p.device.type != "cpu" for p in pieces):
        raise ValueError("checksum pieces must be 1-D uint8 CPU tensors")
    if len(key) != KEY_BYTES:
        raise ValueError(f"checksum key must be {KEY_BYTES} bytes")
    arrays = [p.numpy() for p in pieces]
    if algorithm == NH32T2_BLAKE3:
        from loader.transfer.nh_hash import nh32t2_digest_pieces

        return nh32t2_digest_pieces(arrays, key)
    if algorithm == NH64_BLAKE3:
        from loader.transfer.nh_hash import nh64_digest_pieces

        return nh64_digest_pieces(arrays, key)
    if algorithm == BLAKE3_KEYED:
        hasher = blake3.blake3(key=key)
        for array in arrays:
            hasher.update(memoryview(array))
        return hasher.hexdigest()
    raise ValueError(f"checksum algorithm {algorithm!r} cannot be computed over pieces")


def warm_up(algorithm: str) -> None:
    """Prepare `algorithm` (compile its NH kernel) before the first bucket needs it."""
    if algorithm in (NH32T2_BLAKE3, NH64_BLAKE3):
        from loader.transfer import nh_hash

        nh_hash.warm_up(nh_hash.nh32t2_digest if algorithm == NH32T2_BLAKE3 else nh_hash.nh64_digest)


def warm_up_in_background(algorithm: str) -> threading.Thread:
    """Start warm_up(algorithm) in a daemon thread and return it. Preparing the NH kernel
    costs about a second of CPU (numba's import and cache load); started while the model
    is built, it is done before the first bucket arrives, and a verification that comes
    earlier waits only for the rest of it. A failure is logged here and raised again
    where the kernel is next needed."""
    thread = threading.Thread(
        target=_warm_up_logged, args=(algorithm,), name="netloader-checksum-warm-up", daemon=True
    )
    thread.start()
    return thread


def _warm_up_logged(algorithm: str) -> None:
    try:
        warm_up(algorithm)
    except Exception as e:  # noqa: BLE001 - the verification that needs it raises it again
        logging.getLogger(__name__).warning("checksum %s: warm-up failed: %s", algorithm, e)


def _host_bytes(data: torch.Tensor):
    return (data if data.device.type == "cpu" else data.cpu()).numpy()


def _signed(x: int) -> int:
    x &= _MASK64
    return x - (1 << 64) if x >> 63 else x


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 words (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _position_keys(positions: torch.Tensor, seed: int) -> torch.Tensor:
    """splitmix64(seed + i * golden) mod p for each position i (int64 arithmetic wraps)."""
    z = positions * _GOLDEN + seed
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    z = z ^ _shr(z, 31)
    return (z & 0x7FFFFFFF) % _P


def _mlh31(data: torch.Tensor, key: bytes) -> str:
    n = data.numel()
    seeds = [_signed(int.from_bytes(key[i : i + 8], "little")) for i in (0, 8)]
    words_total = (n + 1) // 2
    step = _CHUNK_WORDS * _ROWS_PER_STEP
    sums = [0, 0]
    device = data.device
    for start in range(0, words_total, step):
        count = min(step, words_total - start)
        chunk = data[2 * start : min(n, 2 * (start + count))]
        rows = -(-count // _CHUNK_WORDS)
        padded = torch.zeros(rows * _CHUNK_WORDS * 2, dtype=torch.uint8, device=device)
        padded[: chunk.numel()] = chunk
        pairs = padded.view(-1, 2).to(torch.int64)
        words = (pairs[:, 0] | (pairs[:, 1] << 8)).view(rows, _CHUNK_WORDS)
        positions = torch.arange(start, start + rows * _CHUNK_WORDS, device=device)
        for lane, seed in enumerate(seeds):
            keys = _position_keys(positions, seed).view(rows, _CHUNK_WORDS)
            row_sums = (words * keys).sum(dim=1) % _P
            sums[lane] = (sums[lane] + int(row_sums.sum())) % _P
    return f"{n:x}-{sums[0]:08x}-{sums[1]:08x}"
