"""Stream transforms over blobs (torch's `_extensions`: `_StorageInfo.transform_descriptors`), undone while reading.

torch's FileSystemWriter can pass each item's bytes through extensions (`ZStandard()` today) and records their
descriptors per blob; its reader undoes them with `transform_from(stream)`. Here a blob with descriptors is read as
its decoded stream (`zstd.py`); `reader_for` gives the reader that does so when any blob needs it.
"""
from __future__ import annotations

from typing import Iterable

from ..model import BlobLocation
from . import zstd
from .io import RangeReader


def reader_for(directory: RangeReader, locations: Iterable[BlobLocation]) -> RangeReader:
    """`directory`, or a reader over it that decodes the transformed blobs among `locations`."""
    if any(location.transform_descriptors for location in locations):
        return zstd.DecodingReader(directory)
    return directory
