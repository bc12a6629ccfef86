"""Stream transforms over blobs (torch's `_extensions`: `_StorageInfo.transform_descriptors`), undone while reading.

torch's FileSystemWriter can pass each item's bytes through extensions (`ZStandard()` today) and records their
descriptors per blob; its reader undoes them with `transform_from(stream)`. Here the same: `open_stream(files,
location, where)` is a transformed blob's decoded bytes as a forward-only `DecodedStream`, read from the blob's
stored range of its file (`BlobLocation`: file, offset, length of the stored bytes) and nothing else. A transformed
blob's bytes therefore have no file offset: a chunk in one is addressed by its location and an offset in the
decoded stream (`blob_reader.BlobReader`). `note` says which transforms a checkpoint uses and whether this install
can undo them.

Adding a transform: a module with a stream class like `zstd.ZstdStream` and one line in `STREAMS`.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Protocol, Tuple

from ..errors import UnsupportedFeatureError
from ..model import BlobLocation, CheckpointMetadata, ChunkTable, LeftOutChunks
from . import zstd
from .io import RangeReader


class DecodedStream(Protocol):
    """A transformed blob's decoded bytes, front to back."""
    pos: int        # decoded bytes read so far
    where: str      # the blob (and its tensor), for messages

    def read_some(self, view: memoryview) -> int:
        """Fill `view` as far as the stream goes; how many bytes that was (fewer only at its end)."""

    def readinto(self, view: memoryview) -> None:
        """Fill `view` (CheckpointError naming the blob if the stream ends first or is corrupt)."""

    def close(self) -> None:
        """Done with it (never read again): its decoding context goes back to the `Contexts` it came from."""


class Contexts:
    """One thread's idle decoding contexts, one per transform, kept between its streams: a stream closed gives its
    context (zstd's, with the window it allocated) to the thread's next stream instead of the next making a fresh
    one. Decoding the 2 GB column-block preset's blobs that way took 8% less CPU (one context per blob: 1,778
    streams). Not shared between threads: a context decodes one stream at a time."""

    __slots__ = ("_idle",)

    def __init__(self) -> None:
        self._idle: Dict[str, object] = {}

    def take(self, name: str) -> Optional[object]:
        return self._idle.pop(name, None)

    def give(self, name: str, context: object) -> None:
        self._idle[name] = context


class Transform(NamedTuple):
    name: str                   # short, for messages
    stream: type                # (files, location, where, read_bytes=..., contexts=...) -> DecodedStream
    head_prefetch_bytes: int    # stored bytes worth asking the kernel for before a blob's head is decoded
    head_read_bytes: int        # stored bytes read at a time while only the head is decoded (locating)


# descriptors, as .metadata lists them -> the transform that undoes them
STREAMS: Dict[Tuple[str, ...], Transform] = {
    (zstd.DESCRIPTOR,): Transform("zstd", zstd.ZstdStream, zstd.HEAD_PREFETCH_BYTES, zstd.HEAD_READ_BYTES),
}


def check_supported(location: BlobLocation, where: str) -> None:
    """UnsupportedFeatureError naming the blob (`where`) and its transforms when no stream in STREAMS undoes them."""
    if location.transform_descriptors not in STREAMS:
        known = [list(d) for d in STREAMS]
        raise UnsupportedFeatureError(
            f"{where} was saved through the stream transform(s) {list(location.transform_descriptors)}; streamconv undoes only "
            f"{known[0] if len(known) == 1 else known} (torch's ZStandard extension). Load the checkpoint with the "
            "extension that wrote it and save it again without `_extensions` (or with [ZStandard()]).")


def open_stream(files: RangeReader, location: BlobLocation, where: str,
                head_only: bool = False, contexts: Optional[Contexts] = None) -> DecodedStream:
    """The decoded stream of the transformed blob at `location`, at decoded offset 0. `head_only`: only its first
    records will be read (locating), so the stored bytes are read in small steps. `contexts`: the calling thread's
    idle decoding contexts, one of which the stream takes and gives back when closed (None: a fresh one)."""
    check_supported(location, where)
    transform = STREAMS[location.transform_descriptors]
    if head_only:
        return transform.stream(files, location, where, read_bytes=transform.head_read_bytes, contexts=contexts)
    return transform.stream(files, location, where, contexts=contexts)


def name(descriptors: Tuple[str, ...]) -> str:
    """The transform's short name for messages ("zstd")."""
    known = STREAMS.get(descriptors)
    return known.name if known else "+".join(descriptors)


def head_prefetch_bytes(location: BlobLocation) -> int:
    """Stored bytes worth prefetching before a transformed blob's head is decoded (its first block)."""
    known = STREAMS.get(location.transform_descriptors)
    return min(location.length, known.head_prefetch_bytes if known else 0)


def where(location: BlobLocation, fqn: Optional[str]) -> str:
    """How messages name a transformed blob (and its tensor, when known)."""
    tensor = f" for tensor {fqn!r}" if fqn else ""
    return f"{location.relative_path}: blob at offset {location.offset} ({location.length} bytes){tensor}"


def _any_transformed(meta: CheckpointMetadata) -> bool:
    if any(b.location is not None and b.location.transform_descriptors for b in meta.byte_entries):
        return True
    if any(descriptors for descriptors, _ in meta.left_out_blobs):
        return True
    return any(map(_transformed, (t.chunks for t in meta.tensors)))


def _transformed(chunks) -> bool:
    if isinstance(chunks, LeftOutChunks):
        return False        # their blobs are in `meta.left_out_blobs`
    if isinstance(chunks, ChunkTable):
        return chunks.transformed
    return any(c.location.transform_descriptors for c in chunks)


def note(meta: CheckpointMetadata) -> Optional[str]:
    """One line for `inspect` and `plan`: which stream transforms the blobs carry and whether this install can
    undo them (None for a checkpoint without transforms)."""
    if not _any_transformed(meta):      # without making a location per chunk (481k at 671B parameters)
        return None
    counts: Dict[Tuple[str, ...], int] = {}
    locations = {c.location for t in meta.tensors if not isinstance(t.chunks, LeftOutChunks) for c in t.chunks}
    locations.update(b.location for b in meta.byte_entries if b.location is not None)
    for location in locations:
        if location.transform_descriptors:
            counts[location.transform_descriptors] = counts.get(location.transform_descriptors, 0) + 1
    # The left-out tensors' blobs are counted by row: each chunk has a blob of its own in every torch writer.
    blobs = len(locations)
    for descriptors, n in meta.left_out_blobs:
        blobs += n
        if descriptors:
            counts[descriptors] = counts.get(descriptors, 0) + n
    if not counts:
        return None
    total = sum(counts.values())
    unknown = [list(d) for d in counts if d != (zstd.DESCRIPTOR,)]
    what = f"{total} of {blobs} blobs are stored through a stream transform"
    if unknown:
        return (f"{what}: {unknown[0]} is not one streamconv can undo (it knows {[zstd.DESCRIPTOR]}, torch's "
                "ZStandard extension); convert will refuse those tensors")
    if zstd.can_decode():
        import zstandard
        return (f"{what}: zstd-compressed ({zstd.DESCRIPTOR}, FileSystemWriter(_extensions=[ZStandard()])); "
                f"decompressed while streaming (zstandard {zstandard.__version__})")
    return (f"{what}: zstd-compressed ({zstd.DESCRIPTOR}, FileSystemWriter(_extensions=[ZStandard()])); "
            f"convert needs the `zstandard` package, not installed here: {zstd.ZSTD_EXTRA}")
