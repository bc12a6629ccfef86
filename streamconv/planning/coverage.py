"""Chunk geometry: deduplicate replicated chunks and prove they tile the global shape exactly once.

Pure functions over `Chunk` boxes. The proof is: every box inside the shape, the box volumes add up to
the shape's volume, and every element is covered an odd number of times (a corner-parity test, see
`_corners_cancel`). Together these mean every element is covered exactly once, without materialising a
per-element mask (memory ∝ tensor size) or comparing chunks pairwise (time ∝ chunks²). Layouts that are grids
(FSDP, TP, EP and their products) are first proven by a cheaper test over columns (`_tiles_as_grid`); what it does
not prove goes to the general one, which also words the refusal.
"""
from __future__ import annotations

import itertools
from typing import List, Optional, Sequence, Tuple

from ..errors import CoverageError
from ..model import Chunk, ChunkTable
from ..source.unpickle import describe


def _volume(sizes: Sequence[int]) -> int:
    n = 1
    for s in sizes:
        n *= s
    return n


def boxes_of(chunks: Sequence[Chunk]) -> List[Tuple[Tuple[int, ...], Tuple[int, ...]]]:
    """(offsets, sizes) of each chunk; read from the columns of a ChunkTable without making its Chunks."""
    if isinstance(chunks, ChunkTable):
        return [chunks.box(i) for i in range(len(chunks))]
    return [(tuple(c.offsets), tuple(c.sizes)) for c in chunks]


def columns_of(chunks: Sequence[Chunk]) -> List[Sequence[int]]:
    """The offsets of each dim, then the sizes of each dim, one column each, of chunks that all have one number of
    dims (a ChunkTable's ndim; else the first chunk's). A whole table's columns are slices of its own, made in C."""
    if isinstance(chunks, ChunkTable):
        width, boxes = 2 * chunks.ndim, chunks.boxes
        if chunks.rows is None:
            return [boxes[k::width] for k in range(width)]
        starts = [width * row for row in chunks.rows]
        return [[boxes[at + k] for at in starts] for k in range(width)]
    ndim = len(chunks[0].offsets) if chunks else 0
    return ([[c.offsets[d] for c in chunks] for d in range(ndim)]
            + [[c.sizes[d] for c in chunks] for d in range(ndim)])


def dedup_chunks(chunks: Sequence[Chunk]) -> Sequence[Chunk]:
    """Drop chunks whose box (offsets, sizes) repeats an earlier one (replicated data saved twice).

    Empty boxes are dropped too: FSDP2 writes a 0-element chunk for ranks that hold nothing.
    The survivors are sorted by offsets so that plans do not depend on rank order. A ChunkTable gives a view of
    itself (sharing its columns), anything else a tuple.
    """
    if isinstance(chunks, ChunkTable):
        # Offsets then sizes of each chunk, flat (a 0-d tensor's chunks have none)
        keys = list(zip(*columns_of(chunks))) if chunks.ndim else [()] * len(chunks)
        first = dict(zip(reversed(keys), range(len(keys) - 1, -1, -1)))      # the last write is the first index
        n = chunks.ndim
        return chunks.select([first[key] for key in sorted(first) if 0 not in key[n:]])
    seen = set()
    kept: List[Chunk] = []
    for chunk in chunks:
        box = (tuple(chunk.offsets), tuple(chunk.sizes))
        if box in seen or _volume(chunk.sizes) == 0:
            continue
        seen.add(box)
        kept.append(chunk)
    kept.sort(key=lambda c: (tuple(c.offsets), tuple(c.sizes)))
    return tuple(kept)


def _overlap(a: Chunk, b: Chunk) -> bool:
    for ao, asz, bo, bsz in zip(a.offsets, a.sizes, b.offsets, b.sizes):
        if ao + asz <= bo or bo + bsz <= ao:
            return False
    return True


def _describe(chunk: Chunk) -> str:
    return f"offsets {list(chunk.offsets)} sizes {list(chunk.sizes)} ({describe(chunk.location.relative_path)})"


# Box corners per chunk are 2**(dims split anywhere); past this many split dims the corner test would cost
# more than the pairwise sweep, which then runs without a limit. DCP layouts split 1-3 dims.
MAX_CORNER_DIMS = 12
# Comparisons the sweep may spend looking for an overlapping pair to name once the tiling test has failed.
MAX_PAIR_COMPARISONS = 2_000_000


def check_coverage(fqn: str, shape: Sequence[int], chunks: Sequence[Chunk]) -> None:
    """Raise CoverageError unless `chunks` cover `shape` exactly once.

    A grid is proven by `_tiles_as_grid`. Otherwise
    O(n log n) in the number of chunks n (for the few dims a layout splits): every box inside the shape,
    volumes adding up to the shape's, and the corner test of `_corners_cancel`. Only when those fail does a
    sweep look for two overlapping chunks to name (with a comparison limit).
    """
    ndim = len(shape)
    if ndim and len(chunks) and _same_dims(chunks, ndim) and _tiles_as_grid(shape, columns_of(chunks), len(chunks)):
        return
    split_dims = set()
    covered = 0
    boxes = boxes_of(chunks)
    for i, (offsets, sizes) in enumerate(boxes):
        if len(offsets) != ndim or len(sizes) != ndim:
            raise CoverageError(
                f"tensor {describe(fqn)}: chunk {_describe(chunks[i])} has {len(sizes)} dims, tensor shape "
                f"{list(shape)} has {ndim}")
        for dim, (off, size, full) in enumerate(zip(offsets, sizes, shape)):
            if off < 0 or size < 0 or off + size > full:
                raise CoverageError(
                    f"tensor {describe(fqn)}: chunk {_describe(chunks[i])} runs outside the global shape "
                    f"{list(shape)} in dim {dim}")
            if size != full:
                split_dims.add(dim)
        covered += _volume(sizes)
    total = _volume(shape)
    if total == 0:          # nothing to cover (and every box inside the shape is empty)
        return
    dims = sorted(split_dims)
    if covered == total and len(dims) <= MAX_CORNER_DIMS and _corners_cancel(shape, boxes, dims):
        return
    pair = _overlapping_pair(chunks, dims, limit=MAX_PAIR_COMPARISONS if len(dims) <= MAX_CORNER_DIMS else None)
    if pair is not None:
        raise CoverageError(
            f"tensor {describe(fqn)}: chunks overlap but are not identical: {_describe(pair[0])} and "
            f"{_describe(pair[1])}; the checkpoint is inconsistent (mixed saves in one folder?)")
    if covered != total:
        raise CoverageError(
            f"tensor {describe(fqn)}: chunks cover {covered} of {total} elements of shape {list(shape)}; "
            "a rank's data is missing from the checkpoint (was every rank's __R_*.distcp copied?)")
    if len(dims) <= MAX_CORNER_DIMS:
        raise CoverageError(
            f"tensor {describe(fqn)}: its {len(chunks)} chunks add up to the shape's {total} elements but overlap "
            "somewhere and leave a gap elsewhere; the checkpoint is inconsistent (mixed saves in one folder?)")


def _same_dims(chunks: Sequence[Chunk], ndim: int) -> bool:
    if isinstance(chunks, ChunkTable):
        return chunks.ndim == ndim
    return all(len(c.offsets) == ndim and len(c.sizes) == ndim for c in chunks)


def _tiles_as_grid(shape: Sequence[int], columns: Sequence[Sequence[int]], count: int) -> bool:
    """True when the `count` boxes (`columns_of`) are the distinct cells of a grid over `shape`: in each dim the
    boxes' distinct (offset, size) spans partition the dim (non-empty, end to end, from 0 to its size), the boxes
    are distinct, and there are as many as the grid has cells. Each box is then one cell and each cell one box:
    the boxes tile the shape exactly once. A few set operations in C per dim, where the corner test makes 2**d
    tuples a box in Python: FSDP, TP and EP layouts are grids; any other layout falls to the general proof."""
    ndim, cells = len(shape), 1
    for d, full in enumerate(shape):
        end = 0
        spans = sorted(set(zip(columns[d], columns[ndim + d])))
        for offset, size in spans:
            if offset != end or size <= 0:
                return False
            end += size
        if end != full:
            return False
        cells *= len(spans)
    return cells == count and len(set(zip(*columns))) == count


def _corners_cancel(shape: Sequence[int], boxes: Sequence[Tuple[Tuple[int, ...], Tuple[int, ...]]],
                    dims: Sequence[int]) -> bool:
    """True iff every corner point (restricted to the split `dims`) occurs an even number of times over all
    chunks, except the shape's own corners, which occur an odd number of times.

    Why this proves the tiling: modulo 2 a box's indicator is the sum of the orthant indicators at its
    2**d corners, so the test says that the number of chunks covering each element is odd inside the
    shape. With every box inside the shape and volumes adding up to the shape's, each element is then
    covered exactly once. Dims no chunk splits contribute the same factor to every box and are left out;
    empty boxes cancel out by themselves and are skipped.
    """
    odd: set = set()
    toggle = odd.symmetric_difference_update
    for offsets, sizes in boxes:
        bounds = [(offsets[d], offsets[d] + sizes[d]) for d in dims]
        if any(lo == hi for lo, hi in bounds):
            continue
        toggle(itertools.product(*bounds))
    return odd == set(itertools.product(*[(0, shape[d]) for d in dims]))


def _overlapping_pair(chunks: Sequence[Chunk], dims: Sequence[int],
                      limit: Optional[int]) -> Optional[Tuple[Chunk, Chunk]]:
    """Two non-empty chunks that overlap, found by a sweep along the split dim with the most distinct starts
    (so that chunks sharing a start in another dim do not make it quadratic); None if there are none, or
    if `limit` comparisons did not find one."""
    boxes = [c for c in chunks if _volume(c.sizes)]
    if not boxes:
        return None
    if not dims:                                  # every box spans the whole shape: any two overlap
        return (boxes[0], boxes[1]) if len(boxes) > 1 else None
    sweep = max(dims, key=lambda d: len({c.offsets[d] for c in boxes}))
    boxes.sort(key=lambda c: c.offsets[sweep])
    comparisons = 0
    for i, a in enumerate(boxes):
        end = a.offsets[sweep] + a.sizes[sweep]
        for b in itertools.islice(boxes, i + 1, None):
            if b.offsets[sweep] >= end:
                break
            if _overlap(a, b):
                return a, b
            comparisons += 1
            if limit is not None and comparisons >= limit:
                return None
    return None
