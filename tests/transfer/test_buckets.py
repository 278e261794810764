import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loader.transfer.buckets import (
    BucketReader,
    direct_min_bytes,
    max_bucket_bytes,
    message_spans,
    plan_buckets,
    unpack_bucket,
)
from loader.transfer.manifest import TensorSpec, build_manifest


def specs(sizes):
    return [TensorSpec(f"t{i}", "uint8", (n,), n) for i, n in enumerate(sizes)]


def test_small_tensors_are_coalesced_and_large_ones_sent_directly_in_pieces():
    # bucket 1600 bytes: tensors of >= 100 bytes (1/16) go directly, at most 1600 at a time
    plan = plan_buckets(specs([10, 20, 30, 600, 40, 99, 100, 5000, 5]), bucket_bytes=1600)
    assert [(b.direct, [i.name for i in b.items], b.nbytes) for b in plan] == [
        (False, ["t0", "t1", "t2"], 60),
        (True, ["t3"], 600),
        (False, ["t4", "t5"], 139),
        (True, ["t6"], 100),
        (True, ["t7"], 1600),
        (True, ["t7"], 1600),
        (True, ["t7"], 1600),
        (True, ["t7"], 200),
        (False, ["t8"], 5),
    ]
    assert [b.items[0].tensor_offset for b in plan[4:8]] == [0, 1600, 3200, 4800]
    assert [b.index for b in plan] == list(range(9))
    assert BucketReader({}).staging_bytes(plan) == 139 and max_bucket_bytes(plan) == 1600
    assert direct_min_bytes(64 << 20) == 4 << 20


def test_bucket_is_flushed_before_it_overflows():
    plan = plan_buckets(specs([40, 40, 40]), bucket_bytes=1000)  # all below 1000 // 16
    assert [[i.name for i in b.items] for b in plan] == [["t0", "t1", "t2"]]
    plan = plan_buckets(specs([60, 60, 60]), bucket_bytes=1000)  # 62-byte direct threshold
    assert [[i.name for i in b.items] for b in plan] == [["t0", "t1", "t2"]]
    plan = plan_buckets(specs([60] * 20), bucket_bytes=1000)
    assert [len(b.items) for b in plan] == [16, 4]
    assert [i.offset for i in plan[1].items] == [0, 60, 120, 180]


def test_empty_tensors_are_skipped():
    assert plan_buckets(specs([0, 0]), bucket_bytes=100) == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 5000), max_size=60), st.integers(1, 3000))
def test_plan_covers_every_byte_once_in_order(sizes, bucket_bytes):
    plan = plan_buckets(specs(sizes), bucket_bytes)
    names = list(dict.fromkeys(item.name for b in plan for item in b.items))
    assert names == [f"t{i}" for i, n in enumerate(sizes) if n > 0]
    covered = {}
    for b in plan:
        assert b.nbytes <= bucket_bytes  # fits one staging slot
        for item in b.items:  # each tensor's bytes exactly once, in order
            assert item.tensor_offset == covered.get(item.name, 0)
            covered[item.name] = item.tensor_offset + item.nbytes
        if b.direct:
            item = b.items[0]
            assert len(b.items) == 1 and sizes[int(item.name[1:])] >= direct_min_bytes(bucket_bytes)
        else:
            assert b.nbytes <= bucket_bytes
            assert all(i.nbytes < direct_min_bytes(bucket_bytes) for i in b.items)
            offset = 0
            for item in b.items:
                assert item.offset == offset
                offset += item.nbytes
            assert offset == b.nbytes
    assert sum(b.nbytes for b in plan) == sum(sizes)


def test_pack_and_unpack_round_trip_mixed_dtypes():
    src = {
        "a": torch.randn(3, 5),
        "b": torch.randn(7).to(torch.bfloat16),
        "c": torch.arange(11, dtype=torch.int64),
        "d": torch.tensor(True),
        "nc": torch.randn(40, 60).t(),  # non-contiguous source, sent in pieces
        "big": torch.randn(1000),
    }
    dest = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in src.items()}
    manifest = build_manifest(src)
    plan = plan_buckets(manifest.specs, bucket_bytes=1024)
    assert sum(1 for b in plan if b.items[0].name == "nc") > 1
    reader = BucketReader(src)
    buffer = torch.empty(reader.staging_bytes(plan), dtype=torch.uint8)
    for bucket in plan:
        unpack_bucket(bucket, reader.read(bucket, buffer).clone(), dest)
    for k in src:
        assert torch.equal(dest[k], src[k]), k


def test_item_messages_carry_each_packed_item_from_its_own_storage():
    src = {
        "a": torch.randn(3, 5),
        "nc": torch.randn(6, 4).t(),  # non-contiguous: sent from a contiguous copy
        "b": torch.arange(7, dtype=torch.int16),
        "big": torch.randn(1000),
    }
    plan = plan_buckets(build_manifest(src).specs, bucket_bytes=1024)
    reader = BucketReader(src)
    assert reader.staging_bytes(plan, item_messages=True) == 0  # nothing is packed
    for bucket in plan:
        spans = message_spans(bucket, item_messages=True)
        messages = reader.messages(bucket, None, item_messages=True)
        assert [m.numel() for m in messages] == [n for _, n in spans]
        packed = reader.read(bucket, torch.empty(bucket.nbytes, dtype=torch.uint8)).clone()
        assert torch.equal(torch.cat(messages), packed)  # the same bytes, in bucket order
        if bucket.direct:
            assert spans == [(0, bucket.nbytes)]
        else:
            assert spans == [(item.offset, item.nbytes) for item in bucket.items]
            assert message_spans(bucket, item_messages=False) == [(0, bucket.nbytes)]
    whole = [b for b in plan if not b.direct][0]
    a_bytes = src["a"].reshape(-1).view(torch.uint8)
    first = reader.messages(whole, None, item_messages=True)[0]
    assert first.data_ptr() == a_bytes.data_ptr()  # sent from the tensor, not a copy
