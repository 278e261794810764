"""Pieces: the slices of tensors a resharding transfer moves, as views into the tensors.

A slice along dimension 0 is contiguous; along another dimension it is a strided view
(rows of contiguous runs). Either travels as the bytes of its row-major copy: the source
reads it (buckets.BucketReader makes a strided view contiguous), the client writes each
received byte range back through `write_bytes`, run by run, into the live tensor.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from loader.transfer.reshard_plan import SliceRequest


def piece_views(
    tensors: dict[str, torch.Tensor], requests: list[SliceRequest], at_source: bool
) -> dict[str, torch.Tensor]:
    """The views the requests name: into the source's local tensors (`at_source`) or the
    client's. ValueError naming the request when it does not fit the tensor."""
    views: dict[str, torch.Tensor] = {}
    for r in requests:
        t = tensors.get(r.name)
        if t is None:
            raise ValueError(f"{r.piece_name}: no such tensor")
        if r.piece_name in views:
            raise ValueError(f"{r.piece_name}: asked twice")
        if r.dim is None:
            if r.length != (t.shape[0] if t.dim() else 1):
                raise ValueError(f"{r.piece_name}: a whole tensor of another extent")
            views[r.piece_name] = t
            continue
        start = r.source_start if at_source else r.client_start
        if not 0 <= r.dim < t.dim() or r.length <= 0 or start + r.length > t.shape[r.dim]:
            raise ValueError(f"{r.piece_name}: outside the tensor's shape {list(t.shape)}")
        view = t.narrow(r.dim, start, r.length)
        byte_rows(view)  # refuses views it could not write run by run
        views[r.piece_name] = view
    return views


def byte_rows(t: torch.Tensor) -> torch.Tensor:
    """`t`'s bytes as a 2-D uint8 view [rows, run] whose rows are contiguous runs (a
    slice of a contiguous tensor along any dimension). ValueError for other layouts."""
    if t.numel() == 0:
        return t.new_empty((0, 1), dtype=torch.uint8)
    run, k = 1, t.dim()
    while k > 0 and (t.shape[k - 1] == 1 or t.stride(k - 1) == run):
        run *= t.shape[k - 1]
        k -= 1
    outer, row_stride = 1, t.stride(k - 1) if k else run
    for d in range(k - 1, -1, -1):
        if t.shape[d] != 1 and t.stride(d) != row_stride * outer:
            raise ValueError(f"a tensor of shape {list(t.shape)}, strides {t.stride()} is no slice")
        outer *= t.shape[d]
    return t.detach().as_strided((outer, run), (row_stride, 1)).view(torch.uint8)


def write_bytes(
    dest: torch.Tensor, offset: int, data: torch.Tensor, copy: Callable[[torch.Tensor, torch.Tensor], None]
) -> None:
    """Write `data` (1-D uint8) at byte `offset` of the row-major bytes of `dest`, a
    possibly strided slice: a head run, whole rows at once, a tail run."""
    rows = byte_rows(dest)
    width = rows.shape[1]
    n, done = data.numel(), 0
    row, col = divmod(offset, width)
    if col:
        k = min(width - col, n)
        copy(rows[row, col : col + k], data[:k])
        done, row = k, row + 1
    whole = (n - done) // width
    if whole:
        copy(rows[row : row + whole], data[done : done + whole * width].view(whole, width))
        done, row = done + whole * width, row + whole
    if done < n:
        copy(rows[row, : n - done], data[done:])
