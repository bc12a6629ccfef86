"""Source integrity: each chunk's bytes against the CRC-32 that torch.save recorded for them.

torch.save stores every record of its zip archive with a CRC-32 in the central directory, and nothing reads
it back (`torch.load` does not): a flipped bit in a `.distcp` file would convert into a plausible, wrong model.
`ChunkIntegrity.check` streams a chunk's storage record through `zlib.crc32` in small pieces (bounded memory)
and raises `CorruptChunkError` naming the file, tensor and byte range when the sums differ.

The executor calls it just before it moves a chunk's bytes, so the pass reads the source from disk once and
the copy that follows finds it in the page cache. Each chunk is checked once per run, whatever the threads.
"""
from __future__ import annotations

import threading
import zlib
from typing import List, Mapping

from ..errors import CorruptChunkError
from .io import RangeReader
from ..model import BlobLocation, Chunk, StoredTensor

CRC_PIECE_BYTES = 1 << 20   # read and summed at a time; small enough to stay in the CPU cache between the two


def crc32_of_range(reader: RangeReader, relative_path: str, offset: int, nbytes: int, piece: memoryview) -> int:
    """zlib.crc32 of `nbytes` bytes of a file at `offset`, read into `piece` a part at a time."""
    crc = 0
    done = 0
    while done < nbytes:
        step = min(len(piece), nbytes - done)
        view = piece[:step]
        reader.read_into(relative_path, offset + done, [view])
        crc = zlib.crc32(view, crc)   # releases the GIL for large buffers: workers sum side by side
        done += step
    return crc


class ChunkIntegrity:
    """Checks chunks' CRC-32s once each; safe to share between writer threads."""

    def __init__(self, reader: RangeReader, stored: Mapping[BlobLocation, StoredTensor],
                 piece_bytes: int = CRC_PIECE_BYTES, while_decoding: bool = False):
        self.reader = reader
        # Compressed chunks (source/zstd.py): sum each record as the copy decodes it, and fail at its end, instead of
        # decoding it twice. For `convert`, where any failure discards the output; `verify` checks first, so that a
        # corrupt chunk is reported as such rather than as a difference.
        self.while_decoding = while_decoding
        self.stored = stored
        self.piece_bytes = piece_bytes
        self._lock = threading.Lock()
        self._done: set = set()
        self._local = threading.local()
        self.checked_chunks = 0
        self.checked_bytes = 0
        self.unrecorded: List[BlobLocation] = []   # chunks whose writer stored no CRC (compute_crc32=False)

    def _piece(self) -> memoryview:
        piece = getattr(self._local, "piece", None)
        if piece is None:
            piece = self._local.piece = memoryview(bytearray(self.piece_bytes))
        return piece

    def check(self, fqn: str, chunk: Chunk) -> None:
        """Raise CorruptChunkError if the chunk's storage record does not match its recorded CRC-32."""
        location = chunk.location
        with self._lock:
            if location in self._done:
                return
        stored = self.stored[location]
        recorded = stored.crc32
        if stored.transforms and stored.record_nbytes and self.while_decoding:
            with self._lock:
                if location in self._done:
                    return
                self._done.add(location)
            if self.reader.check_while_reading(
                    location, stored.record_offset, stored.record_nbytes,
                    lambda computed, recorded: self._judge(fqn, chunk, stored, computed, recorded)):
                return
            with self._lock:        # declined: summed below, like a plain chunk
                self._done.discard(location)
        if stored.transforms and stored.record_nbytes:
            # A compressed blob: the record is decoded and summed, and its CRC-32 is read from the zip data
            # descriptor that follows it in the decoded stream (the central directory is at the far end).
            from .zstd import crc_after_record
            computed, recorded = crc_after_record(self.reader, location.relative_path, stored.record_offset,
                                                  stored.record_nbytes, self._piece(), fqn, location)
        elif recorded is not None and stored.record_nbytes:
            computed = crc32_of_range(self.reader, location.relative_path, stored.record_offset,
                                      stored.record_nbytes, self._piece())
        else:
            computed = None
        self._judge(fqn, chunk, stored, computed, recorded, first=True)

    def _judge(self, fqn: str, chunk: Chunk, stored: StoredTensor, computed, recorded, first: bool = False) -> None:
        """Raise CorruptChunkError if the sums differ, else count the chunk (checked, or unrecorded); with `first`,
        only if no other thread counted it meanwhile."""
        location = chunk.location
        if recorded is not None and stored.record_nbytes:
            if computed != recorded:
                begin, end = stored.record_offset, stored.record_offset + stored.record_nbytes
                what = f"bytes [{begin}, {end}) of the file fail their"
                if stored.transforms:   # report the compressed blob, not the decoded addresses
                    what = (f"the storage record decoded from the zstd blob at [{location.offset}, "
                            f"{location.offset + location.length}) fails its")
                    begin, end = location.offset, location.offset + location.length
                raise CorruptChunkError(
                    f"{location.relative_path}: tensor {fqn!r}, chunk at offsets {list(chunk.offsets)}: {what} "
                    f"CRC-32 check (recorded {recorded:08x}, computed "
                    f"{computed:08x}): the checkpoint file is corrupt (disk or copy error) and would convert into "
                    "wrong weights. Restore it from a good copy (--no-crc skips this check).",
                    file=location.relative_path, tensor=fqn, begin=begin, end=end,
                    recorded=recorded, computed=computed)
        with self._lock:
            if first:
                if location in self._done:
                    return
                self._done.add(location)
            if recorded is None and stored.record_nbytes:
                self.unrecorded.append(location)
            else:
                self.checked_chunks += 1
                self.checked_bytes += stored.record_nbytes
