"""The streaming executor: follows a `ShardPlan`, writing one shard file from chunk bytes.

Two ways a tensor's bytes move, chosen per tensor by the plan's geometry:

* copy   — every chunk is one contiguous run of the output (FSDP's dim-0 shards). Bytes go straight
           from the .distcp file to the shard (copy_file_range, in-kernel), or through the buffer in
           pieces when a dtype cast is needed.
* blocks — chunks are N-D boxes (tensor-parallel Shard(1), 2-D meshes). The output is built band by
           band: a band is a contiguous run of the output no larger than the buffer; each chunk's part of
           the band is one contiguous range of its file, scatter-read (preadv) straight into place.

Memory is the one working buffer whatever the tensor or model size. numpy (and the cast module) are
imported only when a tensor needs assembly or a cast: the plain copy path starts faster without them.
"""
from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Callable, List, Mapping, Optional, Sequence

from . import dtypes
from .errors import CheckpointError
from .io import RangeReader
from .model import BlobLocation, Chunk, StoredTensor
from .plan import ShardPlan, TensorPlan
from .sink import ShardSink

if TYPE_CHECKING:
    import numpy as np

Progress = Callable[[int], None]


class Cancelled(Exception):
    """Another worker failed or the user interrupted; this one stopped between two steps."""


def _prod(values: Sequence[int]) -> int:
    n = 1
    for v in values:
        n *= v
    return n


def _row_major_strides(shape: Sequence[int]) -> List[int]:
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= s
    return strides[::-1]


def check_stored(t: TensorPlan, chunk: Chunk, stored: StoredTensor) -> None:
    """The blob must hold exactly the chunk the metadata promises, laid out row-major."""
    where = f"tensor {t.source_fqn!r}, chunk at offsets {list(chunk.offsets)} in {chunk.location.relative_path}"
    if stored.dtype != t.src_dtype:
        raise CheckpointError(f"{where}: stored dtype {stored.dtype} but .metadata says {t.src_dtype}")
    if tuple(stored.shape) != tuple(chunk.sizes):
        raise CheckpointError(f"{where}: stored shape {list(stored.shape)} but .metadata says {list(chunk.sizes)}")
    if not stored.is_contiguous:
        raise CheckpointError(
            f"{where}: stored with non-contiguous strides {list(stored.stride)}; streamconv copies row-major "
            "chunks only. Re-save the checkpoint after calling .contiguous() on that tensor.")


class Executor:
    """Writes shards. One instance owns the buffers, so they are allocated once for the whole run."""

    def __init__(self, reader: RangeReader, stored: Mapping[BlobLocation, StoredTensor], buffer_bytes: int,
                 progress: Optional[Progress] = None, stop=None):
        self.reader = reader
        self.stop = stop     # a threading.Event set when the run is abandoned, checked between steps
        self.stored = stored
        self.buffer_bytes = buffer_bytes
        self.progress = progress or (lambda n: None)
        self._buffer = None   # numpy uint8 array, grown on first use

    def _scratch(self, nbytes: int, t: TensorPlan) -> np.ndarray:
        """A block of `nbytes` at the start of the one working buffer, with room behind it for the block's
        cast output (casts run in place, so a widening cast needs the larger size)."""
        import numpy as np
        from .cast import output_nbytes
        need = nbytes
        if t.is_cast:
            need = max(nbytes, output_nbytes(nbytes, t.src_dtype, t.dst_dtype))
        if self._buffer is None or len(self._buffer) < need:
            self._buffer = None     # drop the old one first, so the two never coexist
            self._buffer = np.empty(need, dtype=np.uint8)
        return self._buffer[:nbytes]

    def _cast(self, block: np.ndarray, t: TensorPlan) -> np.ndarray:
        """Cast in place. 0-d tensors take torch's scalar loop, whose NaN bits differ from its vector loop."""
        from .cast import cast_into, output_nbytes
        out = self._buffer[:output_nbytes(len(block), t.src_dtype, t.dst_dtype)]
        return cast_into(block, t.src_dtype, t.dst_dtype, out=out, path="scalar" if not t.shape else "vector")

    def _band_budget(self, t: TensorPlan) -> int:
        """Source bytes per step: whole elements, at least one, and small enough that the step's cast output
        (in place, in the same buffer) fits the buffer too."""
        src = dtypes.BY_NAME[t.src_dtype].itemsize
        widest = max(src, dtypes.BY_NAME[t.dst_dtype].itemsize)
        share = self.buffer_bytes * src // widest
        return max(src, share // src * src)

    def write_shard(self, shard: ShardPlan, sink: ShardSink) -> None:
        try:
            sink.write_at(0, shard.header)
            for t in shard.tensors:
                self.write_tensor(t, sink)
        finally:
            sink.close()

    def _check_stop(self) -> None:
        if self.stop is not None and self.stop.is_set():
            raise Cancelled()

    def write_tensor(self, t: TensorPlan, sink: ShardSink) -> None:
        self._check_stop()
        for chunk in t.chunks:
            check_stored(t, chunk, self.stored[chunk.location])
        if t.pieces:
            from .gather import write_pieces    # transformed tensors (see transforms.py)
            write_pieces(self, t, sink)
        elif t.is_row_contiguous:
            self._copy_runs(t, sink)
        else:
            self._assemble_bands(t, sink)

    # -- copy: each chunk is one run of the output -------------------------------------------------
    def _copy_runs(self, t: TensorPlan, sink: ShardSink) -> None:
        src_item = dtypes.BY_NAME[t.src_dtype].itemsize
        dst_item = dtypes.BY_NAME[t.dst_dtype].itemsize
        strides = _row_major_strides(t.shape)
        budget = self._band_budget(t)
        for chunk in t.chunks:
            stored = self.stored[chunk.location]
            first = sum(o * s for o, s in zip(chunk.offsets, strides))
            dst = t.begin + first * dst_item
            src = stored.data_offset
            path = chunk.location.relative_path
            if not t.is_cast:
                self.reader.copy_to(sink, path, src, dst, stored.data_nbytes)
                self.progress(stored.data_nbytes)
                continue
            remaining = stored.data_nbytes
            while remaining:
                self._check_stop()
                step = min(remaining, budget)
                block = self._scratch(step, t)
                self.reader.read_into(path, src, [memoryview(block)])
                out = self._cast(block, t)
                sink.write_at(dst, out)
                self.progress(len(out))
                src += step
                dst += step // src_item * dst_item
                remaining -= step

    # -- blocks: assemble bands of the output from N-D chunks --------------------------------------
    def _assemble_bands(self, t: TensorPlan, sink: ShardSink) -> None:
        shape = t.shape
        ndim = len(shape)
        item = dtypes.BY_NAME[t.src_dtype].itemsize
        dst_item = dtypes.BY_NAME[t.dst_dtype].itemsize
        budget = self._band_budget(t)
        # Band dim d: the outermost dim whose single step (all inner dims in full) fits the buffer.
        inner = [_prod(shape[d + 1:]) * item for d in range(ndim)]
        d = next(dim for dim in range(ndim) if inner[dim] <= budget)
        rows_per_band = max(1, budget // inner[d])
        out_strides = _row_major_strides(shape)
        for prefix in itertools.product(*(range(s) for s in shape[:d])):
            for a in range(0, shape[d], rows_per_band):
                b = min(shape[d], a + rows_per_band)
                self._check_stop()
                band = self._scratch((b - a) * inner[d], t)
                for chunk in t.chunks:
                    self._fill_band(t, chunk, prefix, d, a, b, band, item)
                first = sum(p * s for p, s in zip(prefix, out_strides)) + a * out_strides[d]
                out = self._cast(band, t) if t.is_cast else band
                sink.write_at(t.begin + first * dst_item, out)
                self.progress(len(out))

    def _fill_band(self, t: TensorPlan, chunk: Chunk, prefix, d: int, a: int, b: int,
                   band: np.ndarray, item: int) -> None:
        offs, sizes, shape = chunk.offsets, chunk.sizes, t.shape
        for p, o, s in zip(prefix, offs, sizes):
            if not o <= p < o + s:
                return
        lo, hi = max(a, offs[d]), min(b, offs[d] + sizes[d])
        if lo >= hi:
            return
        # Source: rows lo..hi of the chunk at this prefix are one contiguous range of its row-major bytes.
        chunk_strides = _row_major_strides(sizes)
        local = [p - o for p, o in zip(prefix, offs)] + [lo - offs[d]]
        src = self.stored[chunk.location].data_offset + sum(i * s for i, s in zip(local, chunk_strides)) * item
        # Destination: runs inside the band. k is the first dim after which the chunk spans the tensor in
        # full, so each run covers dim k partly and every later dim whole.
        ndim = len(shape)
        k = ndim - 1
        while k > d and sizes[k] == shape[k]:
            k -= 1
        run_bytes = _prod(sizes[k:]) * item
        band_shape = [hi - lo] + list(sizes[d + 1:k])        # the dims iterated to list the runs
        band_strides = _row_major_strides([b - a] + list(shape[d + 1:]))
        base = (lo - a) * band_strides[0] + sum(offs[j] * band_strides[j - d] for j in range(d + 1, ndim))
        mv = memoryview(band)
        if k == d:
            # Every dim after d is whole: rows lo..hi of the chunk are one run of the band.
            start = base * item
            buffers = [mv[start:start + (hi - lo) * _prod(sizes[d + 1:]) * item]]
        else:
            import numpy as np
            grids = np.indices(band_shape, dtype=np.int64).reshape(len(band_shape), -1)
            steps = np.array([band_strides[0]] + band_strides[1:k - d], dtype=np.int64)
            starts = ((base + steps @ grids) * item).tolist()
            buffers = [mv[s:s + run_bytes] for s in starts]
        self.reader.read_into(chunk.location.relative_path, src, buffers)
