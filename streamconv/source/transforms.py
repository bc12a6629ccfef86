"""Stream transforms over blobs (torch's `_extensions`: `_StorageInfo.transform_descriptors`), undone while reading.

torch's FileSystemWriter can pass each item's bytes through extensions (`ZStandard()` today) and records their
descriptors per blob; its reader undoes them with `transform_from(stream)`. Here a blob with descriptors is read as
its decoded stream (`zstd.py`); `reader_for` gives the reader that does so when any blob needs it, and `note`
says which transforms a checkpoint uses and whether this install can undo them.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Tuple

from ..model import BlobLocation, CheckpointMetadata, ChunkTable
from . import zstd
from .io import RangeReader


def reader_for(directory: RangeReader, locations: Iterable[BlobLocation]) -> RangeReader:
    """`directory`, or a reader over it that decodes the transformed blobs among `locations`."""
    if any(location.transform_descriptors for location in locations):
        return zstd.DecodingReader(directory)
    return directory


def _any_transformed(meta: CheckpointMetadata) -> bool:
    if any(b.location is not None and b.location.transform_descriptors for b in meta.byte_entries):
        return True
    return any(t.chunks.transformed if isinstance(t.chunks, ChunkTable)
               else any(c.location.transform_descriptors for c in t.chunks) for t in meta.tensors)


def note(meta: CheckpointMetadata) -> Optional[str]:
    """One line for `inspect` and `plan`: which stream transforms the blobs carry and whether this install can
    undo them (None for a checkpoint without transforms)."""
    if not _any_transformed(meta):      # without making a location per chunk (481k at 671B parameters)
        return None
    counts: Dict[Tuple[str, ...], int] = {}
    locations = {c.location for t in meta.tensors for c in t.chunks}
    locations.update(b.location for b in meta.byte_entries if b.location is not None)
    for location in locations:
        if location.transform_descriptors:
            counts[location.transform_descriptors] = counts.get(location.transform_descriptors, 0) + 1
    if not counts:
        return None
    total = sum(counts.values())
    unknown = [list(d) for d in counts if d != (zstd.ZSTD_DESCRIPTOR,)]
    what = f"{total} of {len(locations)} blobs are stored through a stream transform"
    if unknown:
        return (f"{what}: {unknown[0]} is not one streamconv can undo (it knows {[zstd.ZSTD_DESCRIPTOR]}, torch's "
                "ZStandard extension); convert will refuse those tensors")
    if zstd.can_decode():
        import zstandard
        return (f"{what}: zstd-compressed ({zstd.ZSTD_DESCRIPTOR}, FileSystemWriter(_extensions=[ZStandard()])); "
                f"decompressed while streaming (zstandard {zstandard.__version__})")
    return (f"{what}: zstd-compressed ({zstd.ZSTD_DESCRIPTOR}, FileSystemWriter(_extensions=[ZStandard()])); "
            f"convert needs the `zstandard` package, not installed here: {zstd.ZSTD_EXTRA}")
