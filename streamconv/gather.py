"""Writing a transformed tensor: its `Piece`s (see `transforms.py`), copied or gathered band by band.

* copy   — every piece is one contiguous run of both its chunk and the output (unstacked layers, row slices of
           dim-0 shards): bytes go file to file (copy_file_range), or through the buffer when cast.
* gather — otherwise (RoPE's every-other-row pieces, blocks of tensor-parallel chunks): the output is built band
           by band in the executor's one buffer. Each piece's part of a band is a list of runs (source offset,
           band offset, length); runs of one file are sorted by source offset and consecutive ones are read by one
           scatter read (preadv), so RoPE's interleaved rows of a chunk come in one call.

Memory is the executor's buffer, as for plain tensors. Called by `Executor.write_tensor` for plans with pieces.
"""
from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, List, Sequence, Tuple

from . import dtypes
from .model import numel
from .transforms import Piece, is_contiguous_piece, piece_strides, run_split

# Runs gathered per band at most (about when their bookkeeping would pass a few MiB); only tensors whose pieces
# have runs of a few bytes ever reach it.
MAX_RUNS_PER_BAND = 1 << 14

if TYPE_CHECKING:
    from .executor import Executor
    from .plan import TensorPlan
    from .sink import ShardSink


def write_pieces(ex: "Executor", t: "TensorPlan", sink: "ShardSink") -> None:
    if ex.integrity is not None:
        for piece in t.pieces:      # each stored chunk is checked once per run, however many pieces it feeds
            ex.integrity.check(t.source_fqn, piece.chunk)
    if all(is_contiguous_piece(p, t.shape) for p in t.pieces):
        _copy_pieces(ex, t, sink)
    else:
        _gather_bands(ex, t, sink)


def _copy_pieces(ex: "Executor", t: "TensorPlan", sink: "ShardSink") -> None:
    src_item = dtypes.BY_NAME[t.src_dtype].itemsize
    dst_item = dtypes.BY_NAME[t.dst_dtype].itemsize
    for piece in t.pieces:
        ex._check_stop()
        dst_strides, _, base = piece_strides(piece, t.shape)
        first = sum(o * s for o, s in zip(piece.dst_start, dst_strides))
        src = ex.stored[piece.chunk.location].data_offset + base * src_item
        ex.copy_run(t, piece.chunk.location.relative_path, src, t.begin + first * dst_item, piece.numel * src_item,
                    sink)



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


def _gather_bands(ex: "Executor", t: "TensorPlan", sink: "ShardSink") -> None:
    import numpy as np
    shape = t.shape
    ndim = len(shape)
    item = dtypes.BY_NAME[t.src_dtype].itemsize
    dst_item = dtypes.BY_NAME[t.dst_dtype].itemsize
    budget = ex._band_budget(t)
    # Band dim d: the outermost dim whose single step (all inner dims in full) fits the buffer (ndim for 0-d).
    inner = [numel(shape[k + 1:]) * item for k in range(ndim)]
    d = next((k for k in range(ndim) if inner[k] <= budget), ndim)
    rows_per_band = max(1, budget // inner[d]) if d < ndim else 1
    if d < ndim:
        # Each run costs a buffer entry (and numpy slots): a band of tiny runs (every other element of a 1-D
        # tensor) is cut short so that the bookkeeping stays small next to the buffer.
        shortest = min(min(run_split(p.sizes, *piece_strides(p, shape)[:2])[1] * item, inner[d]) for p in t.pieces)
        rows_per_band = max(1, min(rows_per_band, MAX_RUNS_PER_BAND * shortest // inner[d]))
    out_strides = [numel(shape[k + 1:]) for k in range(ndim)]
    starts_d = np.array([p.dst_start[d] for p in t.pieces] if d < ndim else [0] * len(t.pieces), dtype=np.int64)
    ends_d = starts_d + np.array([p.sizes[d] for p in t.pieces] if d < ndim else [1] * len(t.pieces), dtype=np.int64)
    rows = range(0, shape[d], rows_per_band) if d < ndim else [0]
    for prefix in itertools.product(*(range(s) for s in shape[:d])):
        for a in rows:
            b = min(shape[d], a + rows_per_band) if d < ndim else 1
            ex._check_stop()
            band_elems = (b - a) * numel(shape[d + 1:]) if d < ndim else 1
            band = ex._scratch(band_elems * item, t)
            hit = np.flatnonzero((starts_d < b) & (ends_d > a))
            _fill(ex, [t.pieces[i] for i in hit], shape, prefix, d, a, b, band, item)
            first = sum(p * s for p, s in zip(prefix, out_strides)) + (a * out_strides[d] if d < ndim else 0)
            out = ex._cast(band, t, first) if t.is_cast else band
            sink.write_at(t.begin + first * dst_item, out)
            ex.progress(len(out))


def _fill(ex: "Executor", pieces: List[Piece], shape, prefix, d: int, a: int, b: int, band, item: int) -> None:
    """Read every piece's part of the band into place: runs grouped per file, sorted by source offset, and each
    stretch of back-to-back source runs read by one scatter read."""
    import numpy as np
    by_file: dict = {}
    for piece in pieces:
        got = band_runs(piece, shape, prefix, d, a, b)
        if got is None:
            continue
        src, dst, run = got
        offset = ex.stored[piece.chunk.location].data_offset
        by_file.setdefault(piece.chunk.location.relative_path, []).append(
            (offset + src * item, dst * item, np.full(len(src), run * item, dtype=np.int64)))
    mv = memoryview(band)
    for path, parts in by_file.items():
        src = np.concatenate([p[0] for p in parts])
        dst = np.concatenate([p[1] for p in parts])
        length = np.concatenate([p[2] for p in parts])
        order = np.argsort(src, kind="stable")
        src, dst, length = src[order], dst[order], length[order]
        breaks = np.flatnonzero(src[1:] != src[:-1] + length[:-1]) + 1
        for lo, hi in _spans(breaks, len(src)):
            buffers = [mv[s:s + n] for s, n in zip(dst[lo:hi].tolist(), length[lo:hi].tolist())]
            ex.reader.read_into(path, int(src[lo]), buffers)


def _spans(breaks, n: int) -> List[Tuple[int, int]]:
    edges = [0] + breaks.tolist() + [n]
    return list(zip(edges, edges[1:]))
