"""NH-BLAKE3 checksums of CPU buckets, at memory speed.

Keyed BLAKE3 over a whole bucket costs ~0.25-0.7 CPU-seconds per GiB on this class of
machine, about as much as receiving the bytes from the kernel: on a few cores it cuts the
transfer rate. Both constructions here read each byte once, with UMAC's NH (Black et al.,
CRYPTO '99) over 1 KiB blocks as the first level and keyed BLAKE3 (a second derived key)
over the block outputs and the byte length as the second. Two different sequences of block
outputs collide only as often as BLAKE3 does; the last block is zero-padded.

- NH32T2 ("nh32t2-blake3", what CPU sources announce): the block is 256 32-bit
  little-endian words m; word j of the first half is paired with word j of the second, and
  two key arrays A and B of 129 words each are derived from the checksum key. Iteration
  t in {0, 1} computes
  NH_t(M) = sum over j < 128 of ((m[j] + A[j+t]) mod 2**32) * ((m[j+128] + B[j+t]) mod 2**32)
  mod 2**64: NH with the Toeplitz key shift of one word pair per iteration, which is
  2**-64-almost-universal on equal-length blocks (2**-32 per iteration, UMAC's Theorem on
  NH-Toeplitz). 32x32->64-bit products vectorize (vpmuludq): ~0.07 CPU-s/GiB here.
- NH64 ("nh64-blake3", announced by sources before NH32T2; still verified): 64-bit words,
  word j paired with word j+64, one 1 KiB key, one 64x64->128-bit product per 16 bytes,
  2**-64-almost-universal; scalar, ~0.18 CPU-s/GiB here.

So two different buckets of the same length get the same checksum with probability about
2**-64 for someone who knows neither key nor checksums (both stay off the data path: the
key is never sent, the checksums travel over the encrypted control channel), as with the
device hash. Without a cluster secret the key is public and NH collisions are easy to
build: such checksums catch corruption, not a deliberate forger (who, without a secret,
could as well impersonate the source).

The kernels are compiled by numba (a vLLM CPU dependency) and release the GIL, so a
verification overlaps the next receive, and on a source inference threads are not held.
"""

from __future__ import annotations

import threading
from functools import lru_cache

import blake3
import numpy as np

BLOCK_BYTES = 1024
_WORDS64 = BLOCK_BYTES // 8
_WORDS32 = BLOCK_BYTES // 4
_NH_CONTEXT = "netloader-mesh 2026-11 bucket checksum nh64 level-1 key v1"
_FINAL_CONTEXT = "netloader-mesh 2026-11 bucket checksum nh64 level-2 key v1"
_NH32_CONTEXT = "netloader-mesh 2026-12 bucket checksum nh32t2 level-1 key v1"
_NH32_FINAL_CONTEXT = "netloader-mesh 2026-12 bucket checksum nh32t2 level-2 key v1"
_NH32_ITERATIONS = 2
_NH32_KEY_WORDS = _WORDS32 // 2 + _NH32_ITERATIONS - 1  # per key array (A, B)

_kernels = None
_kernels_lock = threading.Lock()


def _compile():
    """The numba kernels (compiled once per process, cached on disk by numba)."""
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

    half64 = _WORDS64 // 2

    @njit(nogil=True, cache=True, boundscheck=False)
    def nh64_blocks(words, key, out):  # pragma: no cover - compiled
        # two accumulators per block break the add-with-carry dependency chain
        for b in range(words.shape[0] // _WORDS64):
            base = b * _WORDS64
            lo0 = hi0 = lo1 = hi1 = uint64(0)
            for j in range(0, half64, 2):
                p_lo, p_hi = mul_full(
                    words[base + j] + key[j], words[base + half64 + j] + key[half64 + j]
                )
                s = lo0 + p_lo
                hi0 += p_hi + uint64(s < lo0)
                lo0 = s
                p_lo, p_hi = mul_full(
                    words[base + j + 1] + key[j + 1],
                    words[base + half64 + j + 1] + key[half64 + j + 1],
                )
                s = lo1 + p_lo
                hi1 += p_hi + uint64(s < lo1)
                lo1 = s
            lo = lo0 + lo1
            out[2 * b] = lo
            out[2 * b + 1] = hi0 + hi1 + uint64(lo < lo0)

    half32 = _WORDS32 // 2
    low32 = uint64(0xFFFFFFFF)

    @njit(nogil=True, cache=True, boundscheck=False)
    def nh32t2_blocks(words, key_a, key_b, out):  # pragma: no cover - compiled
        # sums are masked to 32 bits, so LLVM multiplies them as 32x32->64 (vpmuludq)
        for b in range(words.shape[0] // _WORDS32):
            base = b * _WORDS32
            acc0 = uint64(0)
            acc1 = uint64(0)
            for j in range(half32):
                m = uint64(words[base + j])
                n = uint64(words[base + half32 + j])
                acc0 += ((m + key_a[j]) & low32) * ((n + key_b[j]) & low32)
                acc1 += ((m + key_a[j + 1]) & low32) * ((n + key_b[j + 1]) & low32)
            out[2 * b] = acc0
            out[2 * b + 1] = acc1

    return nh64_blocks, nh32t2_blocks


def _kernel(which: int):
    global _kernels
    with _kernels_lock:
        if _kernels is None:
            _kernels = _compile()
        return _kernels[which]


def warm_up(digest) -> None:
    """Compile (or load from numba's cache) the kernel of `digest` (nh32t2_digest or
    nh64_digest) now, off the transfer's path."""
    digest(np.zeros(BLOCK_BYTES + 1, dtype=np.uint8), bytes(32))


@lru_cache(maxsize=16)
def _nh64_keys(key: bytes) -> tuple[np.ndarray, bytes]:
    nh_key = blake3.blake3(key, derive_key_context=_NH_CONTEXT).digest(length=BLOCK_BYTES)
    final_key = blake3.blake3(key, derive_key_context=_FINAL_CONTEXT).digest()
    return np.frombuffer(nh_key, dtype="<u8").copy(), final_key


@lru_cache(maxsize=16)
def _nh32_keys(key: bytes) -> tuple[np.ndarray, np.ndarray, bytes]:
    """Key arrays A and B (as uint64, each word < 2**32) and the final key."""
    words = blake3.blake3(key, derive_key_context=_NH32_CONTEXT).digest(length=8 * _NH32_KEY_WORDS)
    both = np.frombuffer(words, dtype="<u4").astype(np.uint64)
    final_key = blake3.blake3(key, derive_key_context=_NH32_FINAL_CONTEXT).digest()
    return both[:_NH32_KEY_WORDS].copy(), both[_NH32_KEY_WORDS:].copy(), final_key


def nh64_digest(data: np.ndarray, key: bytes) -> str:
    """NH64-BLAKE3 of a 1-D uint8 array (any length), as hex."""
    nh_key, final_key = _nh64_keys(key)
    kernel = _kernel(0)
    return _digest(data, final_key, lambda blocks, out: kernel(blocks.view("<u8"), nh_key, out))


def nh32t2_digest(data: np.ndarray, key: bytes) -> str:
    """NH32T2-BLAKE3 of a 1-D uint8 array (any length), as hex."""
    key_a, key_b, final_key = _nh32_keys(key)
    kernel = _kernel(1)
    return _digest(
        data, final_key, lambda blocks, out: kernel(blocks.view("<u4"), key_a, key_b, out)
    )


def nh32t2_digest_pieces(pieces: list[np.ndarray], key: bytes) -> str:
    """NH32T2-BLAKE3 of the concatenation of 1-D uint8 arrays, without concatenating
    them: only the blocks that straddle two pieces are assembled (at most one per piece)."""
    key_a, key_b, final_key = _nh32_keys(key)
    kernel = _kernel(1)
    return _digest_pieces(
        pieces, final_key, lambda blocks, out: kernel(blocks.view("<u4"), key_a, key_b, out)
    )


def nh64_digest_pieces(pieces: list[np.ndarray], key: bytes) -> str:
    """NH64-BLAKE3 of the concatenation of 1-D uint8 arrays (see nh32t2_digest_pieces)."""
    nh_key, final_key = _nh64_keys(key)
    kernel = _kernel(0)
    return _digest_pieces(pieces, final_key, lambda blocks, out: kernel(blocks.view("<u8"), nh_key, out))


def _digest(data: np.ndarray, final_key: bytes, nh_blocks) -> str:
    return _digest_pieces([data], final_key, nh_blocks)


def _digest_pieces(pieces: list[np.ndarray], final_key: bytes, nh_blocks) -> str:
    """Keyed BLAKE3 of the 16-byte NH outputs of every 1 KiB block of the pieces' bytes
    end to end (the last block zero-padded), then the length."""
    n = sum(p.shape[0] for p in pieces)
    out = np.empty(2 * -(-n // BLOCK_BYTES), dtype=np.uint64)
    block = 0  # the next block's index
    partial = np.zeros(BLOCK_BYTES, dtype=np.uint8)  # a block that straddles pieces
    filled = 0  # bytes of it filled so far
    for piece in pieces:
        start = 0
        if filled:
            start = min(BLOCK_BYTES - filled, piece.shape[0])
            partial[filled : filled + start] = piece[:start]
            filled += start
            if filled < BLOCK_BYTES:
                continue
            nh_blocks(partial, out[2 * block : 2 * block + 2])
            block, filled = block + 1, 0
        whole = (piece.shape[0] - start) // BLOCK_BYTES
        if whole:
            nh_blocks(piece[start : start + whole * BLOCK_BYTES], out[2 * block : 2 * (block + whole)])
            block += whole
        rest = piece[start + whole * BLOCK_BYTES :]
        partial[: rest.shape[0]] = rest
        filled = rest.shape[0]
    if filled:
        partial[filled:] = 0
        nh_blocks(partial, out[2 * block : 2 * block + 2])
    final = blake3.blake3(memoryview(out.view(np.uint8)), key=final_key)
    final.update(n.to_bytes(8, "little"))
    return final.hexdigest()
