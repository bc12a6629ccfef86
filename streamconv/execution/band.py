"""The band assembler: chunks are N-D boxes (tensor-parallel Shard(1), 2-D meshes, MoE experts split on any dim).

The output is built band by band (`geometry.BandGeometry`): each chunk's part of a band is one contiguous range
of its blob's bytes (the file's own, or a zstd blob's decoded stream: `source.blob_reader`). When that part's runs in the band are long it is scatter-read (preadv, IOV_MAX runs at a time)
straight into place; when they are short (8 bytes for a [4096, 256, 4] tensor split on dim 2) it is read whole
into a staging area behind the band (room for one chunk's part of it) and scattered by one strided numpy copy,
so no per-run list ever grows. The next band's ranges are prefetched while this one is filled. A chunk in a zstd
blob that several bands read is decoded once into the buffer when the tensor's compressed chunks fit there
(`held.py`), and its parts are copied from memory.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, List, Mapping, Optional, Sequence, Tuple

from .. import dtypes
from ..model import BlobLocation, Chunk, StoredTensor, numel, row_major_strides
from . import held
from .geometry import Band, BandGeometry, element_dtype
from .workspace import Assembler, Workspace

if TYPE_CHECKING:
    import numpy as np
    from ..planning.plan import TensorPlan
    from ..output.sink import ShardSink

# Runs shorter than this are staged and scattered with numpy; longer ones are read in place with preadv.
SHORT_RUN_BYTES = 4096
# preadv takes at most IOV_MAX (1024 on Linux) buffers per call.
IOV_MAX = 1024


def accepts(t: TensorPlan, stored: Mapping[BlobLocation, StoredTensor]) -> bool:
    """Any tensor without pieces whose chunks are stored row-major: the general case, asked last."""
    return not t.pieces and all(stored[c.location].is_contiguous for c in t.chunks)


def write(ws: Workspace, t: TensorPlan, sink: ShardSink) -> None:
    item = dtypes.BY_NAME[t.src_dtype].itemsize
    layout = held.layout(t, item, ws.buffer_bytes, lambda room: ws.band_budget(t, room),
                         lambda budget, chunks: _bands(t, item, budget, chunks))
    ws.check_integrity(t, t.chunks)     # every band reads every chunk: check them all first
    with ws.reader.keeping(layout.streams_kept(t)):
        _write_bands(ws, t, sink, layout)


def _write_bands(ws: Workspace, t: TensorPlan, sink: ShardSink, layout: held.Layout) -> None:
    geometry = layout.geometry
    holding = held.HeldChunks(ws, t, layout)
    bands = geometry.bands()
    following = next(bands, None)
    parts = _band_parts(t, following, geometry.dim) if following else []
    index = 0
    while following is not None:
        band = following
        ws.check_stop()
        # Ask for the next band's bytes now, so the disk reads them while this band is filled and written.
        following = next(bands, None)
        ahead = _band_parts(t, following, geometry.dim) if following else []
        _prefetch(ws, ahead)
        decoded = holding.before_band(index)
        block, staging = ws.scratch_and_staging(geometry.band_bytes(band), t, layout.staging_bytes)
        for chunk, part in parts:
            _fill(ws, chunk, part, block, staging, decoded.get(chunk.location))
        parts = ahead
        index += 1
        ws.emit(t, sink, block, geometry.first_element(band))


def _bands(t: TensorPlan, item: int, budget_bytes: int, chunks: Sequence[Chunk]) -> BandGeometry:
    """The bands of `t` in `budget_bytes`. When some of `chunks` (those read from their blobs band by band) has
    short runs, they are read whole into a staging area behind the band and scattered by numpy; the staging holds
    one chunk's part of a band, so the band takes the rest of the budget."""
    geometry = BandGeometry.fit(t.shape, item, budget_bytes)
    if _has_short_runs(t, chunks, geometry.dim):
        geometry = BandGeometry.fit_with_staging(t.shape, item, budget_bytes, [c.sizes for c in chunks])
    return geometry


def _band_parts(t: TensorPlan, band: Band, d: int) -> List[Tuple[Chunk, "_BandPart"]]:
    parts = ((chunk, _BandPart.of(t, chunk, band.prefix, d, band.a, band.b)) for chunk in t.chunks)
    return [(chunk, part) for chunk, part in parts if part is not None]


def _prefetch(ws: Workspace, parts: Sequence[Tuple[Chunk, "_BandPart"]]) -> None:
    for chunk, part in parts:
        ws.reader.prefetch(chunk.location, ws.stored[chunk.location].data_offset + part.src_offset,
                           part.nbytes)


def _fill(ws: Workspace, chunk: Chunk, part: "_BandPart", block: np.ndarray, staging: np.ndarray,
          decoded: Optional[np.ndarray] = None) -> None:
    """Copy the chunk's part of the band into place in `block` (the band's bytes). Its source is one contiguous
    range of the chunk's blob (rows lo..hi of dim d at this prefix), or of `decoded`, the chunk's bytes when it
    is held (`held.py`); its destination is a box of the band."""
    location = chunk.location
    if decoded is not None:     # one strided numpy copy, whatever the runs' length
        dst = part.dst_view(block)
        dst[...] = decoded[part.src_offset:part.src_offset + part.nbytes].view(dst.dtype).reshape(dst.shape)
        return
    src = ws.stored[location].data_offset + part.src_offset
    if part.run_bytes == part.nbytes:        # the whole part is one run of the band
        ws.reader.read_into(location, src, [memoryview(block)[part.dst_start:part.dst_start + part.nbytes]])
    elif part.run_bytes < SHORT_RUN_BYTES:
        # Many short runs: one read into staging, then one strided copy (numpy loops in C).
        held_part = staging[:part.nbytes]
        ws.reader.read_into(location, src, [memoryview(held_part)])
        dst = part.dst_view(block)
        dst[...] = held_part.view(dst.dtype).reshape(dst.shape)
    else:
        # Long runs: read straight into place, IOV_MAX runs per call so the list never grows.
        mv = memoryview(block)
        for first in range(0, part.n_runs, IOV_MAX):
            starts = part.run_starts(first, min(part.n_runs, first + IOV_MAX))
            ws.reader.read_into(location, src + first * part.run_bytes,
                                [mv[s:s + part.run_bytes] for s in starts])


def _last_split_dim(t: TensorPlan, chunk: Chunk, d: int) -> int:
    """k: the innermost dim (>= d) the chunk does not span in full; every dim after k is whole."""
    k = len(t.shape) - 1
    while k > d and chunk.sizes[k] == t.shape[k]:
        k -= 1
    return k


def _has_short_runs(t: TensorPlan, chunks: Sequence[Chunk], d: int) -> bool:
    """True if one of `chunks`, in bands cut at dim d, is many runs of fewer than SHORT_RUN_BYTES each. A run
    covers dim k partly and every later dim whole; when k == d the chunk's rows in a band are a single run."""
    item = dtypes.BY_NAME[t.src_dtype].itemsize
    for chunk in chunks:
        k = _last_split_dim(t, chunk, d)
        if k > d and numel(chunk.sizes[k:]) * item < SHORT_RUN_BYTES:
            return True
    return False


class _BandPart:
    """The box a chunk supplies to one band: rows lo..hi of dim d at `prefix`, and the chunk's extent in every
    later dim. Its source is one contiguous range of the chunk's bytes; in the band it is `n_runs` runs."""

    def __init__(self, t: TensorPlan, chunk: Chunk, prefix, d: int, a: int, b: int, lo: int, hi: int):
        shape, offs, sizes = t.shape, chunk.offsets, chunk.sizes
        self.item = item = dtypes.BY_NAME[t.src_dtype].itemsize
        chunk_strides = row_major_strides(sizes)
        local = [p - o for p, o in zip(prefix, offs)] + [lo - offs[d]]
        self.src_offset = sum(i * s for i, s in zip(local, chunk_strides)) * item
        self.nbytes = (hi - lo) * numel(sizes[d + 1:]) * item
        k = _last_split_dim(t, chunk, d)
        self.run_bytes = self.nbytes if k == d else numel(sizes[k:]) * item
        self.n_runs = self.nbytes // self.run_bytes if self.run_bytes else 0
        # Box in the band, whose shape is [b - a] + shape[d+1:]: dims up to k, with dims after k folded into k.
        self.band_shape = [b - a] + list(shape[d + 1:k + 1])
        self.box_start = [lo - a] + list(offs[d + 1:k + 1])
        self.box_size = [hi - lo] + list(sizes[d + 1:k + 1])
        self.fold = numel(shape[k + 1:]) if k > d else numel(shape[d + 1:])   # elements per index of dim k
        self.band_strides = row_major_strides(self.band_shape)
        self.dst_start = sum(i * s for i, s in zip(self.box_start, self.band_strides)) * self.fold * item

    @classmethod
    def of(cls, t: TensorPlan, chunk: Chunk, prefix, d: int, a: int, b: int) -> Optional["_BandPart"]:
        offs, sizes = chunk.offsets, chunk.sizes
        for p, o, s in zip(prefix, offs, sizes):
            if not o <= p < o + s:
                return None
        lo, hi = max(a, offs[d]), min(b, offs[d] + sizes[d])
        if lo >= hi:
            return None
        return cls(t, chunk, prefix, d, a, b, lo, hi)

    def dst_view(self, band: np.ndarray) -> np.ndarray:
        """The part's box as a view of the band, one array element per run (a run is a void scalar when its
        length is not 1, 2, 4 or 8 bytes)."""
        cells = band.reshape(self.band_shape[:-1] + [self.band_shape[-1] * self.fold * self.item])
        index = tuple(slice(o, o + s) for o, s in zip(self.box_start[:-1], self.box_size[:-1]))
        last = self.box_start[-1] * self.fold * self.item
        box = cells[index + (slice(last, last + self.run_bytes),)]
        return box.view(element_dtype(self.run_bytes))[..., 0]

    def run_starts(self, first: int, stop: int) -> List[int]:
        """Band byte offsets of runs first..stop-1, in the chunk's (row-major) order."""
        import numpy as np
        index = np.unravel_index(np.arange(first, stop, dtype=np.int64), self.box_size[:-1])
        offset = np.full(stop - first, self.box_start[-1], dtype=np.int64)   # the band stride of dim k is 1
        for i, o, s in zip(index, self.box_start, self.band_strides):
            offset += (i + o) * s
        return (offset * (self.fold * self.item)).tolist()


ASSEMBLER = Assembler("band", accepts, write)
