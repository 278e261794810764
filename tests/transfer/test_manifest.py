import pytest
import torch

from loader.transfer.manifest import Manifest, build_manifest, unique_tensors


def tensors():
    return {
        "a": torch.zeros(4, 3),
        "b": torch.zeros(7, dtype=torch.bfloat16),
        "c": torch.zeros(2, 2, dtype=torch.int8),
    }


def test_manifest_records_name_dtype_shape_bytes():
    m = build_manifest(tensors())
    assert [(s.name, s.dtype, s.shape, s.nbytes) for s in m.specs] == [
        ("a", "float32", (4, 3), 48),
        ("b", "bfloat16", (7,), 14),
        ("c", "int8", (2, 2), 4),
    ]
    assert m.total_bytes == 66
    assert Manifest.from_wire(m.to_wire()) == m
    assert m.first_difference(build_manifest(tensors())) is None


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda t: t.__setitem__("b", torch.zeros(8, dtype=torch.bfloat16)), "tensor 'b': shape differs"),
        (lambda t: t.__setitem__("b", torch.zeros(7, dtype=torch.float16)), "tensor 'b': dtype differs"),
        (lambda t: t.pop("c"), "tensor 'c': missing on source"),
        (lambda t: t.__setitem__("d", torch.zeros(1)), "tensor 'd': not expected locally"),
        (lambda t: t.__setitem__("a", t.pop("a")), "tensor 'a': source has 'b'"),
    ],
)
def test_mismatch_names_the_first_differing_tensor(mutate, expected):
    remote = tensors()
    mutate(remote)
    reason = build_manifest(tensors()).first_difference(build_manifest(remote))
    assert reason is not None and reason.startswith(expected), reason


def test_tied_weights_are_recorded_once_with_an_alias():
    embed = torch.randn(10, 4)
    t = {"embed": embed, "norm": torch.ones(4), "lm_head": embed}
    unique, aliases = unique_tensors(t)
    assert list(unique) == ["embed", "norm"] and aliases == [("lm_head", "embed")]
    m = build_manifest(t)
    assert [s.name for s in m.specs] == ["embed", "norm"] and m.aliases == (("lm_head", "embed"),)
    untied = {"embed": embed, "norm": torch.ones(4), "lm_head": embed.clone()}
    reason = m.first_difference(build_manifest(untied))
    assert reason is not None and "lm_head" in reason


def test_views_of_one_storage_that_differ_are_not_aliases():
    base = torch.zeros(8)
    unique, aliases = unique_tensors({"lo": base[:4], "hi": base[4:]})
    assert list(unique) == ["lo", "hi"] and aliases == []


@pytest.mark.parametrize(
    "wire",
    [
        None,
        [],
        {"tensors": [], "aliases": [], "extra": 1},
        {"tensors": "x", "aliases": []},
        {"tensors": [["a", "float32", [1], 4, 5]], "aliases": []},
        {"tensors": [[1, "float32", [1], 4]], "aliases": []},
        {"tensors": [["a", "float32", [-1], 4]], "aliases": []},
        {"tensors": [["a", "float32", [True], 4]], "aliases": []},
        {"tensors": [["a", "float32", [1], -4]], "aliases": []},
        {"tensors": [["a", "float32", [1], 4.0]], "aliases": []},
        {"tensors": [["a", "x" * 100, [1], 4]], "aliases": []},
        {"tensors": [["a", "float32", [1] * 40, 4]], "aliases": []},
        {"tensors": [], "aliases": [["a"]]},
        {"tensors": [], "aliases": [["a", 3]]},
    ],
)
def test_untrusted_wire_manifests_are_rejected(wire):
    with pytest.raises(ValueError):
        Manifest.from_wire(wire)
