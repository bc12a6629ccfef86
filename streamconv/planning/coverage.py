"""Chunk geometry: deduplicate replicated chunks and prove they tile the global shape exactly once.

Pure functions over `Chunk` boxes. The proof is: every box inside the shape, the box volumes add up to
the shape's volume, and every element is covered an odd number of times (a corner-parity test, see
`_corners_cancel`). Together these mean every element is covered exactly once, without materialising a
per-element mask (memory ∝ tensor size) or comparing chunks pairwise (time ∝ chunks²).
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


def dedup_chunks(chunks: Sequence[Chunk]) -> Sequence[Chunk]:
    """Drop chunks whose box (offsets, sizes) repeats an earlier one (replicated data saved twice).

    Empty boxes are dropped too: FSDP2 writes a 0-element chunk for ranks that hold nothing.
    The survivors are sorted by offsets so that plans do not depend on rank order. A ChunkTable gives a view of
    itself (sharing its columns), anything else a tuple.
    """
    if isinstance(chunks, ChunkTable):
        boxes = boxes_of(chunks)
        first: dict = {}
        for i, box in enumerate(boxes):
            if _volume(box[1]):
                first.setdefault(box, i)
        return chunks.select(sorted(first.values(), key=boxes.__getitem__))
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

    O(n log n) in the number of chunks n (for the few dims a layout splits): every box inside the shape,
    volumes adding up to the shape's, and the corner test of `_corners_cancel`. Only when those fail does a
    sweep look for two overlapping chunks to name (with a comparison limit).
    """
    ndim = len(shape)
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
