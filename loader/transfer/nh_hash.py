"""NH64-BLAKE3: the keyed checksum of CPU buckets, at memory speed.

Keyed BLAKE3 over a whole bucket costs ~0.7 CPU-seconds per GiB on this class of machine,
more than receiving the bytes from the kernel: on a few cores it halves the transfer
rate. This two-level construction reads each byte once with one 64x64->128-bit multiply
per 16 bytes:

1. NH (the first level of UMAC, Black et al., CRYPTO '99) over 1 KiB blocks of 64-bit
   little-endian words m, with a 1 KiB key k derived from the checksum key:
   NH(M) = sum over i < 64 of ((m[i] + k[i]) mod 2**64) * ((m[i+64] + k[i+64]) mod 2**64)
   mod 2**128. For two different blocks, the outputs are equal with probability at most
   2**-64 over the key (NH with 64-bit words is 2**-64-almost-universal). The last
   block is zero-padded.
2. Keyed BLAKE3 (a second derived key) over the block outputs (16 bytes per KiB) and the
   byte length. Two different sequences collide only as often as BLAKE3 does.

So two different buckets of the same length get the same checksum with probability
about 2**-64 for someone who knows neither key nor checksums (both stay off the data
path: the key is never sent, the checksums travel over the encrypted control channel),
as with the device hash. Without a cluster secret the key is public and NH collisions
are easy to build: such checksums catch corruption, not a deliberate forger (who, without
a secret, could as well impersonate the source).

The NH level is compiled by numba (a vLLM CPU dependency) and releases the GIL, so a
verification overlaps the next receive, and on a source inference threads are not held.
"""

from __future__ import annotations

import threading
from functools import lru_cache

import blake3
import numpy as np

BLOCK_BYTES = 1024
_WORDS = BLOCK_BYTES // 8
_NH_CONTEXT = "netloader-mesh 2026-11 bucket checksum nh64 level-1 key v1"
_FINAL_CONTEXT = "netloader-mesh 2026-11 bucket checksum nh64 level-2 key v1"

_kernel = None
_kernel_lock = threading.Lock()


def _compile():
    """The numba kernel (compiled once per process, cached on disk by numba)."""
    from numba import njit, types, uint64
    from numba.extending import intrinsic

    @intrinsic
    def mul_full(typingctx, a, b):
        """The full 128-bit product of two uint64, as (low, high)."""
        from llvmlite import ir

        sig = types.UniTuple(types.uint64, 2)(types.uint64, types.uint64)

        def codegen(context, builder, signature, args):
            wide = ir.IntType(128)
            product = builder.mul(builder.zext(args[0], wide), builder.zext(args[1], wide))
            low = builder.trunc(product, ir.IntType(64))
            high = builder.trunc(builder.lshr(product, ir.Constant(wide, 64)), ir.IntType(64))
            return context.make_tuple(builder, signature.return_type, [low, high])

        return sig, codegen

    half = _WORDS // 2

    @njit(nogil=True, cache=True, boundscheck=False)
    def nh_blocks(words, key, out):  # pragma: no cover - compiled
        # two accumulators per block break the add-with-carry dependency chain
        for b in range(words.shape[0] // _WORDS):
            base = b * _WORDS
            lo0 = hi0 = lo1 = hi1 = uint64(0)
            for j in range(0, half, 2):
                p_lo, p_hi = mul_full(
                    words[base + j] + key[j], words[base + half + j] + key[half + j]
                )
                s = lo0 + p_lo
                hi0 += p_hi + uint64(s < lo0)
                lo0 = s
                p_lo, p_hi = mul_full(
                    words[base + j + 1] + key[j + 1], words[base + half + j + 1] + key[half + j + 1]
                )
                s = lo1 + p_lo
                hi1 += p_hi + uint64(s < lo1)
                lo1 = s
            lo = lo0 + lo1
            out[2 * b] = lo
            out[2 * b + 1] = hi0 + hi1 + uint64(lo < lo0)

    return nh_blocks


def kernel():
    global _kernel
    with _kernel_lock:
        if _kernel is None:
            _kernel = _compile()
        return _kernel


def warm_up() -> None:
    """Compile (or load from numba's cache) the kernel now, off the transfer's path."""
    nh64_digest(np.zeros(BLOCK_BYTES + 1, dtype=np.uint8), bytes(32))


@lru_cache(maxsize=16)
def _derived_keys(key: bytes) -> tuple[np.ndarray, bytes]:
    nh_key = blake3.blake3(key, derive_key_context=_NH_CONTEXT).digest(length=BLOCK_BYTES)
    final_key = blake3.blake3(key, derive_key_context=_FINAL_CONTEXT).digest()
    return np.frombuffer(nh_key, dtype="<u8").copy(), final_key


def nh64_digest(data: np.ndarray, key: bytes) -> str:
    """NH64-BLAKE3 of a 1-D uint8 array (any length), as hex."""
    nh_key, final_key = _derived_keys(key)
    n = data.shape[0]
    whole = n - n % BLOCK_BYTES
    blocks = -(-n // BLOCK_BYTES)
    out = np.empty(2 * blocks, dtype=np.uint64)
    nh_blocks = kernel()
    if whole:
        nh_blocks(data[:whole].view("<u8"), nh_key, out)
    if whole < n:
        tail = np.zeros(BLOCK_BYTES, dtype=np.uint8)
        tail[: n - whole] = data[whole:]
        nh_blocks(tail.view("<u8"), nh_key, out[-2:])
    final = blake3.blake3(memoryview(out.view(np.uint8)), key=final_key)
    final.update(n.to_bytes(8, "little"))
    return final.hexdigest()
