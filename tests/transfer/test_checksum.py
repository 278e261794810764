import pytest
import torch

from loader.checksum import BLAKE3, SHA256, WSUM64, algorithm_for_device, digest


@pytest.mark.parametrize("algorithm", [BLAKE3, SHA256, WSUM64])
@pytest.mark.parametrize("n", [1, 7, 8192, 8192 * 3 + 5, 100_003])
def test_any_single_byte_change_is_detected(algorithm, n):
    g = torch.Generator().manual_seed(n)
    data = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
    reference = digest(data, algorithm)
    assert digest(data.clone(), algorithm) == reference
    for pos in {0, n // 2, n - 1}:
        corrupted = data.clone()
        corrupted[pos] ^= 0x10
        assert digest(corrupted, algorithm) != reference


def test_swapped_words_are_detected_by_the_device_checksum():
    data = torch.arange(64, dtype=torch.int64).view(torch.uint8)
    swapped = data.view(torch.int64).flip(0).contiguous().view(torch.uint8)
    assert digest(data, WSUM64) != digest(swapped, WSUM64)


def test_unaligned_slice_works():
    data = torch.randint(0, 256, (1001,), dtype=torch.uint8)
    assert digest(data[1:], WSUM64) == digest(data[1:].clone(), WSUM64)


def test_algorithm_choice_and_input_checks():
    assert algorithm_for_device("cpu") == BLAKE3
    assert algorithm_for_device("cuda") == WSUM64 == algorithm_for_device("npu")
    with pytest.raises(ValueError):
        digest(torch.zeros(4), BLAKE3)
    with pytest.raises(ValueError):
        digest(torch.zeros(4, dtype=torch.uint8), "md4")
