"""The gather assembler: a transformed tensor (see `transforms.py`) whose `Piece`s are not each one run of the
output (RoPE's every-other-row pieces, blocks of tensor-parallel chunks; pieces that are whole runs go to the copy
assembler). The output is built band by band in the workspace's buffer (`geometry.BandGeometry`). Each piece's
part of a band is a list of runs (source offset, band offset, length); runs of one blob are sorted by source
offset and consecutive ones are read by one scatter read (preadv), so RoPE's interleaved rows of a chunk come in
one call. Memory is the buffer, as for plain tensors.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, List, Mapping, Sequence, Tuple

from .. import dtypes
from ..model import BlobLocation, StoredTensor
from ..planning.streams import streams_kept
from ..planning.transforms import Piece, piece_strides, run_split
from .geometry import Band, BandGeometry
from .workspace import Assembler, Workspace

if TYPE_CHECKING:
    from ..planning.plan import TensorPlan
    from ..output.sink import ShardSink

# Runs gathered per band at most (about when their bookkeeping would pass a few MiB); only tensors whose pieces
# have runs of a few bytes ever reach it.
MAX_RUNS_PER_BAND = 1 << 14


def accepts(t: TensorPlan, stored: Mapping[BlobLocation, StoredTensor]) -> bool:
    return bool(t.pieces)


def write(ws: Workspace, t: TensorPlan, sink: ShardSink) -> None:
    import numpy as np
    ws.check_integrity(t, (piece.chunk for piece in t.pieces))  # once per run, however many pieces a chunk feeds
    item = dtypes.BY_NAME[t.src_dtype].itemsize
    geometry = _geometry(t, item, ws.band_budget(t))
    d, ndim = geometry.dim, len(t.shape)
    starts_d = np.array([p.dst_start[d] for p in t.pieces] if d < ndim else [0] * len(t.pieces), dtype=np.int64)
    ends_d = starts_d + np.array([p.sizes[d] for p in t.pieces] if d < ndim else [1] * len(t.pieces), dtype=np.int64)
    with ws.reader.keeping(streams_kept(t)):     # the compressed chunks its bands read in turn
        for band in geometry.bands():
            ws.check_stop()
            block = ws.scratch(geometry.band_bytes(band), t)
            hit = np.flatnonzero((starts_d < band.b) & (ends_d > band.a))
            _fill(ws, [t.pieces[i] for i in hit], t.shape, band, d, block, item)
            ws.emit(t, sink, block, geometry.first_element(band))


def _geometry(t: TensorPlan, item: int, budget_bytes: int) -> BandGeometry:
    """Bands of the budget, cut short when they would hold more than MAX_RUNS_PER_BAND runs: each run costs a
    buffer entry (and numpy slots), so a band of tiny runs (every other element of a 1-D tensor) is limited to
    keep the bookkeeping small next to the buffer."""
    geometry = BandGeometry.fit(t.shape, item, budget_bytes)
    if geometry.dim == len(t.shape) or not geometry.row_bytes:
        return geometry
    shortest = min(min(run_split(p.sizes, *piece_strides(p, t.shape)[:2])[1] * item, geometry.row_bytes)
                   for p in t.pieces)
    return geometry.limited(MAX_RUNS_PER_BAND * shortest // geometry.row_bytes)


def band_runs(piece: Piece, shape: Sequence[int], prefix: Sequence[int], d: int, a: int, b: int):
    """The piece's part of the band (output dims < d fixed at `prefix`, rows a..b of dim d, later dims whole) as
    numpy arrays (source element in the chunk, element offset in the band) and the run length in elements.
    None when the piece misses the band."""
    import numpy as np
    starts, sizes = list(piece.dst_start), list(piece.sizes)
    for k, p in enumerate(prefix):
        if not starts[k] <= p < starts[k] + sizes[k]:
            return None
        starts[k], sizes[k] = p, 1
    if d < len(shape):
        lo, hi = max(a, starts[d]), min(b, piece.dst_start[d] + piece.sizes[d])
        if lo >= hi:
            return None
        starts[d], sizes[d] = lo, hi - lo
    dst_strides, src_strides, base = piece_strides(piece, tuple(shape))
    src0 = base + sum((s - o) * st for s, o, st in zip(starts, piece.dst_start, src_strides))
    band_first = sum(p * st for p, st in zip(prefix, dst_strides)) + (a * dst_strides[d] if d < len(shape) else 0)
    dst0 = sum(s * st for s, st in zip(starts, dst_strides)) - band_first
    k, run = run_split(sizes, dst_strides, src_strides)
    if k == 0:
        return np.array([src0], dtype=np.int64), np.array([dst0], dtype=np.int64), run
    grid = np.indices(sizes[:k], dtype=np.int64).reshape(k, -1)
    src = src0 + np.array(src_strides[:k], dtype=np.int64) @ grid
    dst = dst0 + np.array(dst_strides[:k], dtype=np.int64) @ grid
    return src, dst, run


def _fill(ws: Workspace, pieces: List[Piece], shape, band: Band, d: int, block, item: int) -> None:
    """Read every piece's part of the band into place in `block`: runs grouped per blob, sorted by source offset,
    and each stretch of back-to-back source runs read by one scatter read (never across two blobs: a zstd blob's
    offsets are in its own decoded stream)."""
    import numpy as np
    by_blob: dict = {}
    for piece in pieces:
        got = band_runs(piece, shape, band.prefix, d, band.a, band.b)
        if got is None:
            continue
        src, dst, run = got
        offset = ws.stored[piece.chunk.location].data_offset
        by_blob.setdefault(piece.chunk.location, []).append(
            (offset + src * item, dst * item, np.full(len(src), run * item, dtype=np.int64)))
    mv = memoryview(block)
    for location, parts in by_blob.items():
        src = np.concatenate([p[0] for p in parts])
        dst = np.concatenate([p[1] for p in parts])
        length = np.concatenate([p[2] for p in parts])
        order = np.argsort(src, kind="stable")
        src, dst, length = src[order], dst[order], length[order]
        breaks = np.flatnonzero(src[1:] != src[:-1] + length[:-1]) + 1
        for lo, hi in _spans(breaks, len(src)):
            buffers = [mv[s:s + n] for s, n in zip(dst[lo:hi].tolist(), length[lo:hi].tolist())]
            ws.reader.read_into(location, int(src[lo]), buffers)


def _spans(breaks, n: int) -> List[Tuple[int, int]]:
    edges = [0] + breaks.tolist() + [n]
    return list(zip(edges, edges[1:]))


ASSEMBLER = Assembler("gather", accepts, write)
