"""Chunk geometry: deduplicate replicated chunks and prove they tile the global shape exactly once.

Pure functions over `Chunk` boxes. The proof is: every box inside the shape, no two boxes overlap,
and the box volumes add up to the shape's volume. Together these mean every element is covered
exactly once, without materialising a per-element mask (which would cost memory ∝ tensor size).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

from .errors import CoverageError
from .model import Chunk


def _volume(sizes: Sequence[int]) -> int:
    n = 1
    for s in sizes:
        n *= s
    return n


def dedup_chunks(chunks: Sequence[Chunk]) -> Tuple[Chunk, ...]:
    """Drop chunks whose box (offsets, sizes) repeats an earlier one (replicated data saved twice).

    Empty boxes are dropped too: FSDP2 writes a 0-element chunk for ranks that hold nothing.
    The survivors are sorted by offsets so that plans do not depend on rank order.
    """
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
    return f"offsets {list(chunk.offsets)} sizes {list(chunk.sizes)} ({chunk.location.relative_path})"


def check_coverage(fqn: str, shape: Sequence[int], chunks: Sequence[Chunk]) -> None:
    """Raise CoverageError unless `chunks` (already deduplicated) cover `shape` exactly once."""
    ndim = len(shape)
    for chunk in chunks:
        if len(chunk.offsets) != ndim or len(chunk.sizes) != ndim:
            raise CoverageError(
                f"tensor {fqn!r}: chunk {_describe(chunk)} has {len(chunk.sizes)} dims, tensor shape "
                f"{list(shape)} has {ndim}")
        for dim, (off, size, full) in enumerate(zip(chunk.offsets, chunk.sizes, shape)):
            if off < 0 or size < 0 or off + size > full:
                raise CoverageError(
                    f"tensor {fqn!r}: chunk {_describe(chunk)} runs outside the global shape {list(shape)} "
                    f"in dim {dim}")
    # Sorted by offsets, so a box can only overlap boxes that start before its end in dim 0;
    # the pairwise scan stays cheap for the few dozen chunks a tensor has.
    ordered = sorted(chunks, key=lambda c: tuple(c.offsets))
    for i, a in enumerate(ordered):
        for b in ordered[i + 1:]:
            if ndim and b.offsets[0] >= a.offsets[0] + a.sizes[0]:
                break
            if _overlap(a, b):
                raise CoverageError(
                    f"tensor {fqn!r}: chunks overlap but are not identical: {_describe(a)} and {_describe(b)}; "
                    "the checkpoint is inconsistent (mixed saves in one folder?)")
    covered = sum(_volume(c.sizes) for c in chunks)
    total = _volume(shape)
    if covered != total:
        raise CoverageError(
            f"tensor {fqn!r}: chunks cover {covered} of {total} elements of shape {list(shape)}; "
            "a rank's data is missing from the checkpoint (was every rank's __R_*.distcp copied?)")
