"""Compressed chunks held in the buffer while a tensor is built band by band (`strided.py`, `band.py`).

A chunk stored with permuted strides (a transposed weight) gives every band a short run of each of its storage
rows; a column block (tensor-parallel Shard(1)) gives every band a range. From a plain blob those are file reads,
as cheap the second time as the first. A zstd blob's decoded stream goes forward only: a transposed chunk's next
band would decode it again from its start (decoded bytes = the chunk's times its bands). A column block's bands
read it forward, so its stream kept between bands (`planning.streams`: one per block a band reads, each holding
zstd's window) decodes it once too. Such a chunk is *held* instead, when it fits: decoded once, whole, into the
buffer before the first band that reads it, kept until its last, and every band takes its part from there.

`layout` decides, per tensor and before any IO, where everything goes in the writer's buffer:

    [ band | its staging (plain chunks' runs) | (a band's cast output may reach past both) ][ held area ]
    0                                                                          front_bytes ^   ^ + held_bytes

The held area is packed by lifetime (`_pack`: a chunk's slot is reused once its last band is written), so
row-block chunks (FSDP's Shard(0) of a transposed tensor) need room for the one or two live at a time, not for
the tensor. When the compressed chunks do not fit beside bands of the rest of the buffer, nothing is held: the
writer keeps a stream per chunk the bands read in turn (`planning.streams`, counted in the predicted peak), so a
column block is still decoded once, front to back; past MAX_STREAMS_PER_WRITER, and for a transposed chunk
(every band reads a run of every storage row), bands decode again: slower, bounded, never wrong. The whole
buffer stays within the writer's share either way (its size is the plan's prediction).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, List, Mapping, Sequence, Tuple

from .. import dtypes
from ..model import BlobLocation, Chunk, numel, row_major_strides
from ..planning import streams
from .geometry import BandGeometry

if TYPE_CHECKING:
    import numpy as np
    from ..planning.plan import TensorPlan
    from .workspace import Workspace

# Smaller bands keep more chunks live at once: the packing is retried this many times with the larger need.
PACK_ATTEMPTS = 3


@dataclass(frozen=True)
class Held:
    chunk: Chunk
    first_band: int     # decoded just before this band (bands counted in `BandGeometry.bands()` order)
    offset: int         # its bytes' place in the held area
    nbytes: int


@dataclass(frozen=True)
class Layout:
    geometry: BandGeometry
    staging_bytes: int
    front_bytes: int = 0        # where the held area starts: past any band, its staging and its cast output
    held_bytes: int = 0
    held: Tuple[Held, ...] = ()

    def streams_kept(self, t: TensorPlan) -> int:
        """Decoded streams the writer keeps between bands (`BlobReader.keeping`): one when the compressed chunks
        are held (each read whole, at once), else as many as the bands read in turn (`planning.streams`)."""
        return 1 if self.held else streams.streams_kept(t)

    def starting(self) -> Dict[int, List[Held]]:
        """The held chunks to decode before each band, by band index."""
        out: Dict[int, List[Held]] = {}
        for h in self.held:
            out.setdefault(h.first_band, []).append(h)
        return out


def layout(t: TensorPlan, item: int, buffer_bytes: int, band_budget: Callable[[int], int],
           fit: Callable[[int, Sequence[Chunk]], BandGeometry]) -> Layout:
    """Bands of `t` (`item`-byte source elements) in a `buffer_bytes` buffer, holding its compressed chunks when
    they fit. `band_budget(room_bytes)`: source bytes per band in that much buffer (`Workspace.band_budget`);
    `fit(budget_bytes, chunks)`: the assembler's bands in that budget, with staging for `chunks` (the ones read
    from their blobs band by band)."""
    geometry = fit(band_budget(buffer_bytes), t.chunks)
    banded = Layout(geometry, geometry.max_staging_bytes)
    compressed = [c for c in t.chunks if c.location.transform_descriptors and 0 not in c.sizes]
    if not compressed or geometry.dim >= len(t.shape) or _band_count(geometry) == 1:
        return banded       # one band reads each chunk once already
    rest = [c for c in t.chunks if not c.location.transform_descriptors]
    # Never more than the plan counts for the tensor (planning.plan.buffer_need_bytes: the tensor, one chunk's
    # staging, or its cast output), though the writer's share may be larger.
    largest = max(numel(c.sizes) for c in t.chunks) * item
    buffer_bytes = min(buffer_bytes, max(numel(t.shape) * item + largest, t.nbytes))
    need = _pack(compressed, geometry, item)[1]     # as live under the bands that would read them now
    for _ in range(PACK_ATTEMPTS):
        room = buffer_bytes - need
        if room <= 0:
            return banded
        bands = fit(band_budget(room), rest)
        held, peak = _pack(compressed, bands, item)
        front = _front_bytes(t, bands)
        if peak <= need and front + need <= buffer_bytes and bands.dim < len(t.shape):
            return Layout(bands, bands.max_staging_bytes, front, need, held)
        need = max(need, peak)
    return banded


class HeldChunks:
    """One tensor's held area in the workspace's buffer (reserved first, so the bands' smaller requests never
    move it) and the held chunks decoded so far."""

    def __init__(self, ws: Workspace, t: TensorPlan, layout: Layout):
        self.ws, self.starting = ws, layout.starting()
        self.area = None
        if layout.held:
            self.area = ws.scratch_and_staging(0, t, layout.front_bytes + layout.held_bytes)[1][layout.front_bytes:]
        self.decoded: Dict[BlobLocation, "np.ndarray"] = {}

    def before_band(self, index: int) -> Mapping[BlobLocation, "np.ndarray"]:
        """Decode the chunks held from band `index` on; {location: bytes} of every chunk held so far."""
        for h in self.starting.get(index, ()):
            self.decoded[h.chunk.location] = view = self.area[h.offset:h.offset + h.nbytes]
            self.ws.reader.read_into(h.chunk.location, self.ws.stored[h.chunk.location].data_offset,
                                     [memoryview(view)])
        return self.decoded


def _band_count(geometry: BandGeometry) -> int:
    return numel(geometry.shape[:geometry.dim]) * -(-geometry.extent // geometry.rows_per_band)


def _live_bands(chunk: Chunk, geometry: BandGeometry) -> Tuple[int, int]:
    """The first and last band that read the chunk (it is kept in between, even across bands that do not)."""
    d, rows = geometry.dim, geometry.rows_per_band
    per_prefix = -(-geometry.extent // rows)
    strides = row_major_strides(geometry.shape[:d])
    first = sum(o * s for o, s in zip(chunk.offsets[:d], strides))
    last = sum((o + n - 1) * s for o, n, s in zip(chunk.offsets[:d], chunk.sizes[:d], strides))
    top, bottom = chunk.offsets[d], chunk.offsets[d] + chunk.sizes[d] - 1
    return first * per_prefix + top // rows, last * per_prefix + bottom // rows


def _pack(chunks: Sequence[Chunk], geometry: BandGeometry, item: int) -> Tuple[Tuple[Held, ...], int]:
    """Each chunk's slot in the held area, first fit among the chunks still live when it starts; (slots, the
    area's size)."""
    spans = [_live_bands(c, geometry) for c in chunks]
    live: List[Tuple[int, int, int]] = []       # (offset, nbytes, last band) of the slots in use
    placed, peak = [], 0
    for i in sorted(range(len(chunks)), key=lambda i: spans[i]):
        first, last = spans[i]
        nbytes = numel(chunks[i].sizes) * item
        live = sorted(slot for slot in live if slot[2] >= first)
        at = 0
        for offset, n, _ in live:
            if at + nbytes <= offset:
                break
            at = max(at, offset + n)
        live.append((at, nbytes, last))
        placed.append(Held(chunks[i], first, at, nbytes))
        peak = max(peak, at + nbytes)
    return tuple(placed), peak


def _front_bytes(t: TensorPlan, geometry: BandGeometry) -> int:
    """Buffer bytes any band takes: itself and its staging while filled, then its cast output in place."""
    band = geometry.max_band_bytes
    cast = band // dtypes.BY_NAME[t.src_dtype].itemsize * dtypes.BY_NAME[t.dst_dtype].itemsize  # cast.output_nbytes
    return max(band + geometry.max_staging_bytes, cast if t.is_cast else 0)
