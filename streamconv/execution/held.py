"""Compressed chunks held in the buffer while the strided assembler builds a tensor band by band.

A chunk stored with permuted strides (a transposed weight) gives every band a short run of each of its storage
rows. From a plain blob those are file reads, as cheap the second time as the first. A zstd blob's decoded stream
goes forward only, so a band after the first would decode the chunk again from its start (decoded bytes = the
chunk's times its bands). Such a chunk is *held* instead: decoded once, whole, into the buffer before the first
band that reads it, kept until its last, and every band takes its box from there.

`layout` decides, per tensor and before any IO, where everything goes in the writer's buffer:

    [ band | its staging (plain chunks' runs) | (a band's cast output may reach past both) ][ held area ]
    0                                                                          front_bytes ^   ^ + held_bytes

The held area is packed by lifetime (`_pack`: a chunk's slot is reused once its last band is written), so
row-block chunks (FSDP's Shard(0) of a transposed tensor) need room for the one or two live at a time, not for
the tensor. When the compressed chunks do not fit beside bands of the rest of the buffer, nothing is held and
each band decodes again: slower, bounded by the same buffer, never wrong. The whole buffer stays within the
writer's share either way (its size is the plan's prediction).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Sequence, Tuple

from .. import dtypes
from ..model import Chunk, numel, row_major_strides
from .geometry import BandGeometry

if TYPE_CHECKING:
    from ..planning.plan import TensorPlan

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

    def starting(self) -> Dict[int, List[Held]]:
        """The held chunks to decode before each band, by band index."""
        out: Dict[int, List[Held]] = {}
        for h in self.held:
            out.setdefault(h.first_band, []).append(h)
        return out


def layout(t: TensorPlan, item: int, buffer_bytes: int, band_budget) -> Layout:
    """Bands of `t` (`item`-byte source elements) in a `buffer_bytes` buffer, holding its compressed chunks when
    they fit. `band_budget(room_bytes)`: source bytes per band in that much buffer (`Workspace.band_budget`)."""
    geometry = BandGeometry.fit_with_staging(t.shape, item, band_budget(buffer_bytes), [c.sizes for c in t.chunks])
    banded = Layout(geometry, geometry.max_staging_bytes)
    compressed = [c for c in t.chunks if c.location.transform_descriptors and 0 not in c.sizes]
    if not compressed or geometry.dim >= len(t.shape) or _band_count(geometry) == 1:
        return banded       # one band reads each chunk once already
    rest = [c.sizes for c in t.chunks if not c.location.transform_descriptors] or [(1,) * len(t.shape)]
    need = _pack(compressed, geometry, item)[1]     # as live under the bands that would read them now
    for _ in range(PACK_ATTEMPTS):
        room = buffer_bytes - need
        if room <= 0:
            return banded
        bands = BandGeometry.fit_with_staging(t.shape, item, band_budget(room), rest)
        held, peak = _pack(compressed, bands, item)
        front = _front_bytes(t, bands)
        if peak <= need and front + need <= buffer_bytes and bands.dim < len(t.shape):
            return Layout(bands, bands.max_staging_bytes, front, need, held)
        need = max(need, peak)
    return banded


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
