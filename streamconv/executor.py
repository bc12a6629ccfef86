"""The streaming executor: follows a `ShardPlan`, writing one shard file from chunk bytes.

Two ways a tensor's bytes move, chosen per tensor by the plan's geometry:

* copy   — every chunk is one contiguous run of the output (FSDP's dim-0 shards). Bytes go straight
           from the .distcp file to the shard (copy_file_range, in-kernel), or through the buffer in
           pieces when a dtype cast is needed.
* blocks — chunks are N-D boxes (tensor-parallel Shard(1), 2-D meshes, MoE experts split on any dim). The
           output is built band by band: a band is a contiguous run of the output no larger than the buffer;
           each chunk's part of the band is one contiguous range of its file. When that part's runs in the
           band are long it is scatter-read (preadv, IOV_MAX runs at a time) straight into place; when they
           are short (8 bytes for a [4096, 256, 4] tensor split on dim 2) it is read whole into a staging
           half of the buffer and scattered by one strided numpy copy, so no per-run list ever grows.

Memory is the one working buffer whatever the tensor or model size. numpy (and the cast module) are
imported only when a tensor needs assembly or a cast: the plain copy path starts faster without them.
"""
from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Callable, List, Mapping, Optional, Sequence, Tuple

from . import dtypes
from .errors import CheckpointError, UnsupportedFeatureError
from .io import RangeReader
from .model import BlobLocation, Chunk, StoredTensor, numel, row_major_strides
from .plan import ShardPlan, TensorPlan
from .sink import ShardSink

if TYPE_CHECKING:
    import numpy as np

Progress = Callable[[int], None]

# Runs shorter than this are staged and scattered with numpy; longer ones are read in place with preadv.
SHORT_RUN_BYTES = 4096
# preadv takes at most IOV_MAX (1024 on Linux) buffers per call.
IOV_MAX = 1024
# Assembled bytes go to the sink in pieces of this size. On Linux 6.x ext4, one 16 MiB pwrite costs about
# twice the wall and system time of the same bytes in 256 KiB pwrites (2gb shortrun preset, cold cache).
WRITE_PIECE_BYTES = 256 << 10


class Cancelled(Exception):
    """Another worker failed or the user interrupted; this one stopped between two steps."""




def check_stored(t: TensorPlan, chunk: Chunk, stored: StoredTensor) -> None:
    """The blob must hold exactly the chunk the metadata promises, laid out row-major."""
    where = f"tensor {t.source_fqn!r}, chunk at offsets {list(chunk.offsets)} in {chunk.location.relative_path}"
    if stored.dtype != t.src_dtype:
        raise CheckpointError(f"{where}: stored dtype {stored.dtype} but .metadata says {t.src_dtype}")
    if tuple(stored.shape) != tuple(chunk.sizes):
        raise CheckpointError(f"{where}: stored shape {list(stored.shape)} but .metadata says {list(chunk.sizes)}")
    if not stored.is_contiguous:
        # A permutation of contiguous strides (transposed, channels_last) is read in storage order (strided.py).
        from .strided import storage_order
        if storage_order(stored.shape, stored.stride) is None:
            raise CheckpointError(
                f"{where}: stored with strides {list(stored.stride)} for shape {list(stored.shape)}, which are not a "
                "permutation of contiguous strides (an overlapping or gapped view); streamconv reads row-major and "
                "permuted (transposed, channels_last) chunks only. Re-save after calling .contiguous() on that tensor.")
        if t.pieces:
            raise UnsupportedFeatureError(
                f"{where}: stored with permuted strides {list(stored.stride)} and mapped by a trainer layout "
                f"({t.source_fqn!r} -> {t.name!r}); streamconv does not combine the two. Convert with "
                "--source-format hf, or re-save after calling .contiguous() on that tensor.")


class Executor:
    """Writes shards. One instance owns the buffers, so they are allocated once for the whole run."""

    def __init__(self, reader: RangeReader, stored: Mapping[BlobLocation, StoredTensor], buffer_bytes: int,
                 progress: Optional[Progress] = None, stop=None, integrity=None):
        self.reader = reader
        # A reader.integrity.ChunkIntegrity: each chunk's CRC-32 is checked just before its bytes are moved.
        self.integrity = integrity
        self.stop = stop     # a threading.Event set when the run is abandoned, checked between steps
        self.stored = stored
        self.buffer_bytes = buffer_bytes
        self.progress = progress or (lambda n: None)
        self._buffer = None   # numpy uint8 array, grown on first use

    def _scratch(self, nbytes: int, t: TensorPlan, staging_bytes: int = 0) -> np.ndarray:
        """A block of `nbytes` at the start of the one working buffer, with room behind it for the block's
        cast output (casts run in place, so a widening cast needs the larger size) and for `staging_bytes`
        of staging (used while the block is filled, before the cast)."""
        import numpy as np
        from .cast import output_nbytes
        need = nbytes + staging_bytes
        if t.is_cast:
            need = max(need, output_nbytes(nbytes, t.src_dtype, t.dst_dtype))
        if self._buffer is None or len(self._buffer) < need:
            self._buffer = None     # drop the old one first, so the two never coexist
            self._buffer = np.empty(need, dtype=np.uint8)
        return self._buffer[:nbytes]

    def _cast(self, block: np.ndarray, t: TensorPlan, first_element: int) -> np.ndarray:
        """Cast in place the block holding elements first_element.. of the tensor. The elements torch's own
        cast leaves to its scalar loop (a 0-d tensor, the tail that does not fill a vector), whose NaN bits
        differ from its vector loop's, are set aside first and cast the scalar way, as torch does with one
        intra-op thread (see cast.torch_scalar_ranges)."""
        from .cast import cast_into, output_nbytes, torch_scalar_ranges
        src_item = dtypes.BY_NAME[t.src_dtype].itemsize
        dst_item = dtypes.BY_NAME[t.dst_dtype].itemsize
        last_element = first_element + len(block) // src_item
        tails = []
        for a, b in torch_scalar_ranges(t.shape, t.src_dtype, t.dst_dtype, num_threads=1):
            a, b = max(a, first_element) - first_element, min(b, last_element) - first_element
            if a < b:   # at most 15 elements: the copy is tiny
                tails.append((a, b, block[a * src_item:b * src_item].copy()))
        out = cast_into(block, t.src_dtype, t.dst_dtype, out=self._buffer[:output_nbytes(len(block), t.src_dtype,
                                                                                          t.dst_dtype)])
        for a, b, src in tails:
            cast_into(src, t.src_dtype, t.dst_dtype, out=out[a * dst_item:b * dst_item], path="scalar")
        return out

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
        elif not all(self.stored[c.location].is_contiguous for c in t.chunks):
            from .strided import write_strided  # chunks saved transposed / channels_last
            write_strided(self, t, sink)
        elif t.is_row_contiguous:
            self._copy_runs(t, sink)
        else:
            self._assemble_bands(t, sink)

    # -- copy: each chunk is one run of the output -------------------------------------------------
    def _copy_runs(self, t: TensorPlan, sink: ShardSink) -> None:
        dst_item = dtypes.BY_NAME[t.dst_dtype].itemsize
        strides = row_major_strides(t.shape)
        for chunk in t.chunks:
            stored = self.stored[chunk.location]
            first = sum(o * s for o, s in zip(chunk.offsets, strides))
            dst = t.begin + first * dst_item
            src = stored.data_offset
            path = chunk.location.relative_path
            if self.integrity is not None:
                self.integrity.check(t.source_fqn, chunk)   # reads it into the page cache for the copy below
            self.copy_run(t, path, src, dst, stored.data_nbytes, sink)
            if not t.is_cast and stored.storage_crc32 is not None:     # lets the sink skip reading it back
                sink.note_source_crc32(dst, stored.data_nbytes, stored.storage_crc32)

    def copy_run(self, t: TensorPlan, path: str, src: int, dst: int, src_nbytes: int, sink: ShardSink) -> None:
        """Copy `src_nbytes` contiguous source bytes of `t` at `src` in `path` to the output at `dst`: in-kernel,
        or cast through the buffer in steps of the band budget. Shared by whole chunks and gathered pieces."""
        if not t.is_cast:
            self.reader.copy_to(sink, path, src, dst, src_nbytes)
            self.progress(src_nbytes)
            return
        src_item = dtypes.BY_NAME[t.src_dtype].itemsize
        dst_item = dtypes.BY_NAME[t.dst_dtype].itemsize
        budget = self._band_budget(t)
        remaining = src_nbytes
        while remaining:
            self._check_stop()
            step = min(remaining, budget)
            block = self._scratch(step, t)
            self.reader.read_into(path, src, [memoryview(block)])
            out = self._cast(block, t, (dst - t.begin) // dst_item)
            _write(sink, dst, out)
            self.progress(len(out))
            src += step
            dst += step // src_item * dst_item
            remaining -= step

    # -- blocks: assemble bands of the output from N-D chunks --------------------------------------
    def _assemble_bands(self, t: TensorPlan, sink: ShardSink) -> None:
        geometry = _BandGeometry(t, self._band_budget(t))
        staging_bytes = 0
        if _has_short_runs(t, geometry.dim):
            # Short-run chunks are read whole into a staging area behind the band and scattered by numpy;
            # the two share the buffer, so each gets half (a chunk's part of a band is never larger than it).
            geometry = _BandGeometry(t, max(geometry.item, self._band_budget(t) // 2 // geometry.item
                                             * geometry.item))
            staging_bytes = geometry.max_band_bytes
        shape, d = t.shape, geometry.dim
        dst_item = dtypes.BY_NAME[t.dst_dtype].itemsize
        out_strides = row_major_strides(shape)
        if self.integrity is not None:
            for chunk in t.chunks:      # every band reads every chunk: check them all first
                self.integrity.check(t.source_fqn, chunk)
        bands = ((prefix, a, min(shape[d], a + geometry.rows_per_band))
                 for prefix in itertools.product(*(range(s) for s in shape[:d]))
                 for a in range(0, shape[d], geometry.rows_per_band))
        following = next(bands, None)
        parts = self._band_parts(t, *following, d) if following else []
        while following is not None:
            prefix, a, b = following
            self._check_stop()
            # Ask for the next band's bytes now, so the disk reads them while this band is filled and written.
            following = next(bands, None)
            ahead = self._band_parts(t, *following, d) if following else []
            self._prefetch(ahead)
            band_bytes = (b - a) * geometry.row_bytes
            band = self._scratch(band_bytes, t, staging_bytes)
            staging = self._buffer[band_bytes:band_bytes + staging_bytes]
            for chunk, part in parts:
                self._fill_band(t, chunk, part, band, staging)
            parts = ahead
            first = sum(p * s for p, s in zip(prefix, out_strides)) + a * out_strides[d]
            out = self._cast(band, t, first) if t.is_cast else band
            _write(sink, t.begin + first * dst_item, out)
            self.progress(len(out))

    def _band_parts(self, t: TensorPlan, prefix, a: int, b: int, d: int) -> List[Tuple[Chunk, "_BandPart"]]:
        parts = ((chunk, _BandPart.of(t, chunk, prefix, d, a, b)) for chunk in t.chunks)
        return [(chunk, part) for chunk, part in parts if part is not None]

    def _prefetch(self, parts: Sequence[Tuple[Chunk, "_BandPart"]]) -> None:
        for chunk, part in parts:
            self.reader.prefetch(chunk.location.relative_path,
                                 self.stored[chunk.location].data_offset + part.src_offset, part.nbytes)

    def _fill_band(self, t: TensorPlan, chunk: Chunk, part: "_BandPart", band: np.ndarray,
                   staging: np.ndarray) -> None:
        """Copy the chunk's part of the band into place. Its source is one contiguous range of the chunk's
        file (rows lo..hi of dim d at this prefix); its destination is a box of the band."""
        path = chunk.location.relative_path
        src = self.stored[chunk.location].data_offset + part.src_offset
        if part.run_bytes == part.nbytes:        # the whole part is one run of the band
            self.reader.read_into(path, src, [memoryview(band)[part.dst_start:part.dst_start + part.nbytes]])
        elif part.run_bytes < SHORT_RUN_BYTES:
            # Many short runs: one read into staging, then one strided copy (numpy loops in C).
            held = staging[:part.nbytes]
            self.reader.read_into(path, src, [memoryview(held)])
            dst = part.dst_view(band)
            dst[...] = held.view(dst.dtype).reshape(dst.shape)
        else:
            # Long runs: read straight into place, IOV_MAX runs per call so the list never grows.
            mv = memoryview(band)
            for first in range(0, part.n_runs, IOV_MAX):
                starts = part.run_starts(first, min(part.n_runs, first + IOV_MAX))
                self.reader.read_into(path, src + first * part.run_bytes,
                                      [mv[s:s + part.run_bytes] for s in starts])




def _write(sink: ShardSink, offset: int, data: np.ndarray) -> None:
    for start in range(0, len(data), WRITE_PIECE_BYTES):
        sink.write_at(offset + start, data[start:start + WRITE_PIECE_BYTES])


class _BandGeometry:
    """How a tensor is cut into bands: `rows_per_band` indices of dim `dim` at each prefix of the dims
    before it. `dim` is the outermost dim whose single step (all inner dims in full) fits the budget."""

    def __init__(self, t: TensorPlan, budget: int):
        shape = t.shape
        self.item = dtypes.BY_NAME[t.src_dtype].itemsize
        inner = [numel(shape[d + 1:]) * self.item for d in range(len(shape))]
        self.dim = next(dim for dim in range(len(shape)) if inner[dim] <= budget)
        self.row_bytes = inner[self.dim]
        self.rows_per_band = max(1, budget // self.row_bytes) if self.row_bytes else max(1, shape[self.dim])
        self.max_band_bytes = min(self.rows_per_band, shape[self.dim]) * self.row_bytes


def _last_split_dim(t: TensorPlan, chunk: Chunk, d: int) -> int:
    """k: the innermost dim (>= d) the chunk does not span in full; every dim after k is whole."""
    k = len(t.shape) - 1
    while k > d and chunk.sizes[k] == t.shape[k]:
        k -= 1
    return k


def _has_short_runs(t: TensorPlan, d: int) -> bool:
    """True if some chunk, in bands cut at dim d, is many runs of fewer than SHORT_RUN_BYTES each. A run covers
    dim k partly and every later dim whole; when k == d the chunk's rows in a band are a single run."""
    item = dtypes.BY_NAME[t.src_dtype].itemsize
    for chunk in t.chunks:
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
        import numpy as np
        cells = band.reshape(self.band_shape[:-1] + [self.band_shape[-1] * self.fold * self.item])
        index = tuple(slice(o, o + s) for o, s in zip(self.box_start[:-1], self.box_size[:-1]))
        last = self.box_start[-1] * self.fold * self.item
        box = cells[index + (slice(last, last + self.run_bytes),)]
        width = self.run_bytes
        dtype = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}.get(width, np.dtype((np.void, width)))
        return box.view(dtype)[..., 0]

    def run_starts(self, first: int, stop: int) -> List[int]:
        """Band byte offsets of runs first..stop-1, in the chunk's (row-major) order."""
        import numpy as np
        index = np.unravel_index(np.arange(first, stop, dtype=np.int64), self.box_size[:-1])
        offset = np.full(stop - first, self.box_start[-1], dtype=np.int64)   # the band stride of dim k is 1
        for i, o, s in zip(index, self.box_start, self.band_strides):
            offset += (i + o) * s
        return (offset * (self.fold * self.item)).tolist()
