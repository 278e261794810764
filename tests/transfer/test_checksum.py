import secrets

import pytest
import torch

from loader.transfer.checksum import (
    BLAKE3_KEYED,
    KEY_BYTES,
    MLH31,
    NH32T2_BLAKE3,
    NH64_BLAKE3,
    algorithm_for_device,
    digest,
    digest_pieces,
)

KEY = bytes(range(32))


@pytest.mark.parametrize("algorithm", [NH32T2_BLAKE3, NH64_BLAKE3, BLAKE3_KEYED, MLH31])
@pytest.mark.parametrize("n", [1, 7, 1024, 1025, 8192, 8192 * 3 + 5, 100_003, (1 << 21) + 3])
def test_any_single_byte_change_is_detected(algorithm, n):
    g = torch.Generator().manual_seed(n)
    data = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
    reference = digest(data, algorithm, KEY)
    assert digest(data.clone(), algorithm, KEY) == reference
    for pos in {0, n // 2, n - 1}:
        corrupted = data.clone()
        corrupted[pos] ^= 0x10
        assert digest(corrupted, algorithm, KEY) != reference


@pytest.mark.parametrize("algorithm", [NH32T2_BLAKE3, NH64_BLAKE3, BLAKE3_KEYED, MLH31])
def test_the_checksum_depends_on_the_key(algorithm):
    data = torch.randint(0, 256, (10_000,), dtype=torch.uint8)
    assert digest(data, algorithm, KEY) != digest(data, algorithm, secrets.token_bytes(KEY_BYTES))


def test_changes_that_keep_the_old_linear_sum_are_detected():
    """The unkeyed position-weighted sum (wsum64) could be fooled by changing three words
    so that both its sums stay equal; the keyed hash cannot be steered that way."""
    words = torch.zeros(1024, dtype=torch.int64)
    forged = words.clone()
    # +1 at weights 1 and 3, -2 at weight 2: sum and weighted sum unchanged
    forged[0], forged[1], forged[2] = 1, -2, 1
    assert int(forged.sum()) == 0 and int((forged * torch.arange(1, 1025)).sum()) == 0
    data, bad = words.view(torch.uint8), forged.view(torch.uint8)
    assert digest(data, MLH31, KEY) != digest(bad, MLH31, KEY)


def test_swapped_words_are_detected_by_the_device_checksum():
    data = torch.arange(64, dtype=torch.int64).view(torch.uint8)
    swapped = data.view(torch.int64).flip(0).contiguous().view(torch.uint8)
    assert digest(data, MLH31, KEY) != digest(swapped, MLH31, KEY)


def test_trailing_zero_bytes_change_the_device_checksum():
    data = torch.randint(1, 256, (1001,), dtype=torch.uint8)
    assert digest(data, MLH31, KEY) != digest(torch.cat([data, torch.zeros(1, dtype=torch.uint8)]), MLH31, KEY)


def test_unaligned_slice_works():
    data = torch.randint(0, 256, (1001,), dtype=torch.uint8)
    assert digest(data[1:], MLH31, KEY) == digest(data[1:].clone(), MLH31, KEY)


def test_device_checksum_temporaries_stay_bounded():
    """A 64 MiB bucket allocates at most a few MiB at a time (chunked), not 8x the bucket."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestAllocation(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel() * t.element_size())
            return out

    data = torch.zeros(64 << 20, dtype=torch.uint8)
    with LargestAllocation() as mode:
        digest(data, MLH31, KEY)
    assert mode.largest <= 16 << 20, mode.largest


def test_algorithm_choice_and_input_checks():
    assert algorithm_for_device("cpu") == NH32T2_BLAKE3
    assert algorithm_for_device("cuda") == MLH31 == algorithm_for_device("npu")
    with pytest.raises(ValueError):
        digest(torch.zeros(4), BLAKE3_KEYED, KEY)
    with pytest.raises(ValueError):
        digest(torch.zeros(4, dtype=torch.uint8), "md4", KEY)
    with pytest.raises(ValueError):
        digest(torch.zeros(4, dtype=torch.uint8), BLAKE3_KEYED, b"short")


def _words(data: bytes, width: int) -> list[int]:
    return [int.from_bytes(data[i : i + width], "little") for i in range(0, len(data), width)]


def _nh_reference(data: bytes, key: bytes, nh_context: str, final_context: str, block) -> str:
    """Keyed BLAKE3 over `block(padded 1 KiB block, level-1 key bytes)` of every block,
    then the length: both NH constructions, in plain Python integers."""
    import blake3

    nh_key = blake3.blake3(key, derive_key_context=nh_context).digest(length=1032)
    padded = data + bytes(-len(data) % 1024)
    outputs = b"".join(block(padded[i : i + 1024], nh_key) for i in range(0, len(padded), 1024))
    final_key = blake3.blake3(key, derive_key_context=final_context).digest()
    return blake3.blake3(outputs + len(data).to_bytes(8, "little"), key=final_key).hexdigest()


def _nh64_block(block: bytes, nh_key: bytes) -> bytes:
    """NH64 as nh_hash's docstring defines it: 64-bit words, word j paired with j + 64."""
    m, k = _words(block, 8), _words(nh_key[:1024], 8)
    nh = sum(((m[i] + k[i]) % 2**64) * ((m[i + 64] + k[i + 64]) % 2**64) for i in range(64))
    return (nh % 2**128).to_bytes(16, "little")


def _nh32t2_block(block: bytes, nh_key: bytes) -> bytes:
    """NH32T2: 32-bit words, j paired with j + 128, key arrays A and B shifted by t."""
    m, k = _words(block, 4), _words(nh_key, 4)
    a, b = k[:129], k[129:]
    out = b""
    for t in range(2):
        nh = sum(((m[j] + a[j + t]) % 2**32) * ((m[j + 128] + b[j + t]) % 2**32) for j in range(128))
        out += (nh % 2**64).to_bytes(8, "little")
    return out


def _nh64_reference(data: bytes, key: bytes) -> str:
    from loader.transfer import nh_hash

    return _nh_reference(data, key, nh_hash._NH_CONTEXT, nh_hash._FINAL_CONTEXT, _nh64_block)


def _nh32t2_reference(data: bytes, key: bytes) -> str:
    from loader.transfer import nh_hash

    return _nh_reference(
        data, key, nh_hash._NH32_CONTEXT, nh_hash._NH32_FINAL_CONTEXT, _nh32t2_block
    )


@pytest.mark.parametrize("algorithm", [NH64_BLAKE3, NH32T2_BLAKE3])
@pytest.mark.parametrize("n", [1, 1023, 1024, 3000])
def test_the_nh_kernels_compute_the_documented_hash(algorithm, n):
    reference = {NH64_BLAKE3: _nh64_reference, NH32T2_BLAKE3: _nh32t2_reference}[algorithm]
    data = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    assert digest(data, algorithm, KEY) == reference(bytes(data.numpy()), KEY)


@pytest.mark.parametrize(
    "algorithm,word,partner", [(NH64_BLAKE3, torch.int64, 64), (NH32T2_BLAKE3, torch.int32, 128)]
)
def test_nh_detects_a_change_that_keeps_every_word_sum(algorithm, word, partner):
    """Moving one unit from a word to its pair partner keeps plain sums; NH's products do not."""
    data = torch.zeros(2048, dtype=torch.uint8)
    forged = data.clone()
    forged.view(word)[0] = 1
    forged.view(word)[partner] = -1
    assert digest(data, algorithm, KEY) != digest(forged, algorithm, KEY)


def test_nh32t2_second_iteration_catches_what_the_first_cannot_see():
    """Someone who knew the key could swap a pair's two factors of iteration 0, which
    keeps that iteration's sum; the Toeplitz-shifted keys of iteration 1 still differ."""
    from loader.transfer import nh_hash

    key_a, key_b, _ = nh_hash._nh32_keys(KEY)
    a, b = int(key_a[0]), int(key_b[0])
    data = torch.zeros(1024, dtype=torch.uint8)
    m, n = 5, 7
    data.view(torch.int32)[0], data.view(torch.int32)[128] = m, n
    forged = data.clone()
    m2, n2 = (n + b - a) % 2**32, (m + a - b) % 2**32
    assert ((m2 + a) % 2**32) * ((n2 + b) % 2**32) == ((m + a) % 2**32) * ((n + b) % 2**32)
    words = forged.numpy().view("<u4")
    words[0], words[128] = m2, n2
    assert digest(data, NH32T2_BLAKE3, KEY) != digest(forged, NH32T2_BLAKE3, KEY)


def test_the_hash_older_sources_announce_is_a_different_function():
    """A checksum is only ever compared under the algorithm its source announced."""
    data = torch.randint(0, 256, (4096,), dtype=torch.uint8)
    assert digest(data, NH32T2_BLAKE3, KEY) != digest(data, NH64_BLAKE3, KEY)


def test_the_background_warm_up_prepares_the_kernel_and_only_logs_a_failure(monkeypatch, caplog):
    from loader.transfer import checksum, nh_hash

    thread = checksum.warm_up_in_background(NH32T2_BLAKE3)
    assert thread.daemon
    thread.join(120)
    assert not thread.is_alive()
    assert nh_hash._kernels is not None  # compiled (or loaded from numba's cache)

    def broken(algorithm):
        raise RuntimeError("no kernel here")

    monkeypatch.setattr(checksum, "warm_up", broken)
    raised = []
    monkeypatch.setattr("threading.excepthook", lambda args: raised.append(args.exc_value))
    with caplog.at_level("WARNING", logger="loader.transfer.checksum"):
        checksum.warm_up_in_background(NH32T2_BLAKE3).join(10)
    assert raised == []
    assert "warm-up failed: no kernel here" in caplog.text


@pytest.mark.parametrize("algorithm", [NH32T2_BLAKE3, NH64_BLAKE3, BLAKE3_KEYED])
def test_a_digest_over_pieces_is_the_digest_of_their_concatenation(algorithm):
    """Pieces of every length and memory alignment (separate allocations, as the items
    of a packed bucket received in their tensors are), block boundaries inside them."""
    g = torch.Generator().manual_seed(5)
    for trial in range(60):
        count = int(torch.randint(1, 9, (1,), generator=g))
        sizes = torch.randint(0, 3000, (count,), generator=g).tolist()
        if trial % 3 == 0:
            sizes = [1024 * (n % 4) for n in sizes]  # pieces that end on block boundaries
        pieces = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g) for n in sizes]
        whole = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.uint8)
        assert digest_pieces(pieces, algorithm, KEY) == digest(whole, algorithm, KEY), sizes


def test_a_changed_byte_in_any_piece_changes_the_digest_over_pieces():
    pieces = [torch.arange(n, dtype=torch.int64).to(torch.uint8) for n in (5, 1500, 1019, 3)]
    reference = digest_pieces(pieces, NH32T2_BLAKE3, KEY)
    for piece in pieces:
        for at in {0, len(piece) // 2, len(piece) - 1}:
            piece[at] ^= 1
            assert digest_pieces(pieces, NH32T2_BLAKE3, KEY) != reference
            piece[at] ^= 1


def test_the_device_checksum_is_not_computed_over_pieces():
    pieces = [torch.zeros(4, dtype=torch.uint8)]
    with pytest.raises(ValueError, match="cannot be computed over pieces"):
        digest_pieces(pieces, MLH31, KEY)
    with pytest.raises(ValueError):
        digest_pieces([torch.zeros(4)], NH32T2_BLAKE3, KEY)
