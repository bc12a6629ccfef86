"""The strided assembler: chunks stored with permuted strides, a tensor saved as it was, not `.contiguous()` — a
transposed weight (stride (1, rows)), a channels_last conv weight ((C*H*W, 1, W*C, C)). torch.save keeps such
strides (DCP's writer clones only when the storage is larger than the tensor), so the chunk's bytes are the tensor
in another dim order: its *storage order*, the dims sorted by decreasing stride (`geometry.storage_order`).

The output is still built band by band in the workspace's buffer (`geometry.BandGeometry`: the band, and behind
it a staging area the size of the largest chunk's part of a band). A chunk's part of a band is a box of the
chunk; in storage order that box is a box of a row-major array, i.e. runs of the blob's bytes. They are read in
storage order into the staging area (one read of their whole range when it fits there, else run by run in
increasing offset, so a zstd chunk is decoded forward within a band), and one numpy transpose-view copy puts them
in place in the band. Memory stays at the buffer whatever the tensor's size.

A transposed chunk's every band takes a run of every storage row, so a zstd chunk read band by band would be
decoded again from its start for each band after the first (its stream only goes forward). When the tensor's
compressed chunks fit the writer's buffer beside smaller bands they are held instead (`held.py`): each decoded
once, whole, before the first band that reads it, and every band takes its box from there (a strided view, no
staging). When they do not fit, each band decodes them again (decoded bytes = the chunk's times its bands):
slower, bounded, never wrong; a few whole slabs of the storage at a time into the staging, the box cut out with
numpy (`_Box.pieces`), not one read per run. Plain chunks are never held: a file range costs nothing to read again.

A tensor the plan transposes (`TensorPlan.axes`: torchtitan GPT-OSS's [E, 2F, D] expert weights written as
transformers' [E, D, 2F]) is the same case seen from the other side: each row-major chunk of the source is a chunk
of the output stored with permuted strides (`stored_view`), so it is written the same way, band by band.

Strides that are not a permutation of contiguous ones (overlapping or gapped views) are refused by
`executor.check_stored`.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, List, Mapping, Optional, Sequence

from .. import dtypes
from ..model import BlobLocation, Chunk, StoredTensor, numel, row_major_strides
from . import held
from .geometry import Band, BandGeometry, element_dtype, storage_order
from .workspace import Assembler, Workspace

if TYPE_CHECKING:
    import numpy as np
    from ..planning.plan import TensorPlan
    from ..output.sink import ShardSink

# Runs whose offsets are worked out at a time (numpy index arrays of this length, whatever the band holds).
RUN_BATCH = 1024


def accepts(t: TensorPlan, stored: Mapping[BlobLocation, StoredTensor]) -> bool:
    return not t.pieces and (bool(t.axes) or not all(stored[c.location].is_contiguous for c in t.chunks))


def stored_view(t: TensorPlan, stored: StoredTensor) -> StoredTensor:
    """What a chunk's blob holds, in the output's dim order: itself, or for a transposed tensor its shape and
    strides permuted by `t.axes` (a row-major [a, b] chunk is a [b, a] chunk with strides (1, b))."""
    if not t.axes:
        return stored
    return dataclasses.replace(stored, shape=tuple(stored.shape[a] for a in t.axes),
                               stride=tuple(stored.stride[a] for a in t.axes))


def write(ws: Workspace, t: TensorPlan, sink: ShardSink) -> None:
    """Write tensor `t` (no pieces) whose chunks may have permuted strides, band by band; its compressed chunks
    decoded once each when they fit the buffer (`held.py`)."""
    item = dtypes.BY_NAME[t.src_dtype].itemsize
    layout = held.layout(t, item, ws.buffer_bytes, lambda room: ws.band_budget(t, room),
                         lambda budget, chunks: _bands(t, item, budget, chunks))
    geometry = layout.geometry
    ws.check_integrity(t, t.chunks)
    holding = held.HeldChunks(ws, t, layout)
    with ws.reader.keeping(layout.streams_kept(t)):
        for i, band in enumerate(geometry.bands()):
            ws.check_stop()
            decoded = holding.before_band(i)
            block, staging = ws.scratch_and_staging(geometry.band_bytes(band), t, layout.staging_bytes)
            for chunk in t.chunks:
                _fill(ws, t, chunk, band, geometry.dim, block, staging, item, decoded.get(chunk.location))
            ws.emit(t, sink, block, geometry.first_element(band))


def _bands(t: TensorPlan, item: int, budget_bytes: int, chunks: Sequence[Chunk]) -> BandGeometry:
    """The bands of `t` in `budget_bytes`, each with room behind it for one of `chunks`' part of a band (its box,
    packed run by run when its range in the blob is wider than that); a token staging when none is read from its
    blob (the bands still follow chunk extents by the band dim)."""
    staged = [c.sizes for c in chunks] or [(1,) * len(t.shape)]
    return BandGeometry.fit_with_staging(t.shape, item, budget_bytes, staged)


def _fill(ws: Workspace, t: TensorPlan, chunk: Chunk, band: Band, d: int, block: np.ndarray,
          staging: np.ndarray, item: int, decoded: Optional[np.ndarray] = None) -> None:
    """Put the chunk's part of `band` (if any) in place in `block`, the band's bytes; from `decoded`, the
    chunk's bytes, when it is held (decoded whole before its first band)."""
    offs, sizes = chunk.offsets, chunk.sizes
    if 0 in sizes:      # an empty chunk (FSDP2's last ranks) supplies nothing, whatever strides it records
        return
    prefix, a, b = band.prefix, band.a, band.b
    for p, o, s in zip(prefix, offs, sizes):
        if not o <= p < o + s:
            return
    lo, hi = max(a, offs[d]), min(b, offs[d] + sizes[d])
    if lo >= hi:
        return
    stored = stored_view(t, ws.stored[chunk.location])
    order = storage_order(stored.shape, stored.stride)
    # The chunk's part of the band, in chunk-local coordinates, one entry per dim.
    start = [p - o for p, o in zip(prefix, offs)] + [lo - offs[d]] + [0] * (len(sizes) - d - 1)
    count = [1] * d + [hi - lo] + list(sizes[d + 1:])
    # ... and in storage order: a box of the row-major array `sizes` permuted by `order`.
    s_sizes = [sizes[i] for i in order]
    s_start = [start[i] for i in order]
    s_count = [count[i] for i in order]
    # Destination: the band is [b - a] + shape[d+1:]; the box is rows lo-a..hi-a and the chunk's later extents.
    cells = block.view(element_dtype(item)).reshape([b - a] + list(t.shape[d + 1:]))
    index = (slice(lo - a, hi - a),) + tuple(slice(o, o + s) for o, s in zip(offs[d + 1:], sizes[d + 1:]))
    inverse = [order.index(i) for i in range(len(order))]      # storage order back to the tensor's dim order
    outer = order[0] - d    # the outermost storage dim's place in `index` (< 0: a dim before the band's, one index)
    box = _Box(chunk.location, stored.data_offset, s_sizes, s_start, s_count, item)
    for j0, j1, elements in box.pieces(ws, staging, decoded):
        part = list(index)
        if outer >= 0:
            part[outer] = slice(index[outer].start + j0, index[outer].start + j1)
        target = cells[tuple(part)]
        target[...] = elements.transpose(inverse).reshape(target.shape)


class _Box:
    """A chunk's part of a band in storage order: a box (`start`, `count`) of the row-major array `sizes` of
    `item`-byte elements whose first byte is at `data_offset` in the blob at `location`."""

    def __init__(self, location: BlobLocation, data_offset: int, sizes: List[int], start: List[int],
                 count: List[int], item: int):
        self.location, self.data_offset, self.item = location, data_offset, item
        self.sizes, self.start, self.count = sizes, start, count
        self.strides = row_major_strides(sizes)
        self.first = sum(i * s for i, s in zip(start, self.strides))
        self.last = sum((i + c - 1) * s for i, c, s in zip(start, count, self.strides)) + 1

    def pieces(self, ws: Workspace, staging: np.ndarray, decoded: Optional[np.ndarray]):
        """(j0, j1, elements): the box's indices j0..j1 of its outermost dim, as an array viewing `decoded` (the
        chunk held whole) or `staging`. One piece, except for a compressed chunk whose box is spread wider than
        the staging: its stream decodes the gaps between the runs anyway, so whole slabs of the outermost dim are
        decoded into the staging a few at a time and the box cut out of each (numpy per piece, not a read per
        run); when one slab does not fit, run by run."""
        element = element_dtype(self.item)
        if decoded is not None:
            box = tuple(slice(i, i + c) for i, c in zip(self.start, self.count))
            yield 0, self.count[0], decoded.view(element).reshape(self.sizes)[box]
            return
        slab = self.strides[0] * self.item
        per_piece = len(staging) // slab
        spread = (self.last - self.first) * self.item > len(staging)
        if not (self.location.transform_descriptors and spread and per_piece):
            yield 0, self.count[0], _read_box(ws, self, staging)
            return
        inner = (slice(None),) + tuple(slice(i, i + c) for i, c in zip(self.start[1:], self.count[1:]))
        for j0 in range(0, self.count[0], per_piece):
            j1 = min(self.count[0], j0 + per_piece)
            piece = staging[:(j1 - j0) * slab]
            ws.reader.read_into(self.location, self.data_offset + (self.start[0] + j0) * slab, [memoryview(piece)])
            yield j0, j1, piece.view(element).reshape([j1 - j0] + self.sizes[1:])[inner]


def _read_box(ws: Workspace, box: _Box, staging: np.ndarray) -> np.ndarray:
    """The box read into `staging`; returned as an array of shape `box.count` viewing it."""
    import numpy as np
    item, element, strides = box.item, element_dtype(box.item), box.strides
    span = (box.last - box.first) * item
    if span <= len(staging):
        # Close together (a channels_last band is one range): one read of the whole range, and the box is a
        # strided view of it.
        ws.reader.read_into(box.location, box.data_offset + box.first * item, [memoryview(staging[:span])])
        return np.lib.stride_tricks.as_strided(staging[:span].view(element), shape=box.count,
                                               strides=[s * item for s in strides], writeable=False)
    # Far apart (a transposed tensor's band is a short run of every storage row): run by run, in increasing
    # offset, packed in box order. Dims k.. of the box are one run: every dim after k is whole.
    s_sizes, s_count = box.sizes, box.count
    k = len(s_sizes) - 1
    while k > 0 and s_count[k] == s_sizes[k]:
        k -= 1
    run = numel(s_count[k:]) * item
    n_runs = numel(s_count[:k])
    view = memoryview(staging)
    for lo in range(0, n_runs, RUN_BATCH):
        hi = min(n_runs, lo + RUN_BATCH)
        index = np.unravel_index(np.arange(lo, hi, dtype=np.int64), s_count[:k])
        offset = np.full(hi - lo, box.first, dtype=np.int64)
        for i, s in zip(index, strides[:k]):
            offset += i * s
        for j, src in enumerate(offset.tolist()):
            at = (lo + j) * run
            ws.reader.read_into(box.location, box.data_offset + src * item, [view[at:at + run]])
    return staging[:n_runs * run].view(element).reshape(s_count)


ASSEMBLER = Assembler("strided", accepts, write)
