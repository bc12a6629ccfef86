"""Source integrity: each chunk's bytes against the CRC-32 that torch.save recorded for them.

torch.save stores every record of its zip archive with a CRC-32 in the central directory, and nothing reads
it back (`torch.load` does not): a flipped bit in a `.distcp` file would convert into a plausible, wrong model.
`ChunkIntegrity.check` streams a chunk's storage record through `zlib.crc32` in small pieces (bounded memory)
and raises `CorruptChunkError` naming the file, tensor and byte range when the sums differ.

The executor calls it just before it moves a chunk's bytes, so the pass reads the source from disk once and
the copy that follows finds it in the page cache. Each chunk is checked once per run, whatever the threads.
Chunks are read through the run's `blob_reader.BlobReader` (a transformed blob's record, and the CRC-32 recorded
after it, come from its decoded stream); nothing here depends on which transform a blob went through.
"""
from __future__ import annotations

import threading
from typing import List, Mapping

from ..errors import CorruptChunkError
from ..model import BlobLocation, Chunk, StoredTensor
from . import transforms
from .blob_reader import BlobReader

CRC_PIECE_BYTES = 1 << 20   # read and summed at a time; small enough to stay in the CPU cache between the two


class ChunkIntegrity:
    """Checks chunks' CRC-32s once each; safe to share between writer threads."""

    def __init__(self, reader: BlobReader, stored: Mapping[BlobLocation, StoredTensor],
                 piece_bytes: int = CRC_PIECE_BYTES, while_decoding: bool = False):
        if not isinstance(reader, BlobReader):
            raise TypeError("ChunkIntegrity reads through a source.blob_reader.BlobReader, not "
                            f"{type(reader).__name__}")
        self.reader = reader
        # Transformed chunks: sum each record as the copy decodes it, and fail at its end, instead of decoding it
        # twice (BlobReader.check_while_reading). For `convert`, where any failure discards the output; `verify`
        # checks first, so that a corrupt chunk is reported as such rather than as a difference.
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
        if self.while_decoding:
            with self._lock:
                if location in self._done:
                    return
                self._done.add(location)
            if self.reader.check_while_reading(
                    location, lambda computed, recorded: self._judge(fqn, chunk, stored, computed, recorded)):
                return
            with self._lock:        # declined (a plain blob): summed below
                self._done.discard(location)
        computed, recorded = self.reader.record_crc32(location, self._piece())
        self._judge(fqn, chunk, stored, computed, recorded, first=True)

    def _judge(self, fqn: str, chunk: Chunk, stored: StoredTensor, computed, recorded, first: bool = False) -> None:
        """Raise CorruptChunkError if the sums differ, else count the chunk (checked, or unrecorded); with `first`,
        only if no other thread counted it meanwhile."""
        location = chunk.location
        if recorded is not None and computed is not None and stored.record_nbytes:
            if computed != recorded:
                begin, end = stored.record_offset, stored.record_offset + stored.record_nbytes
                what = f"bytes [{begin}, {end}) of the file fail their"
                if stored.transforms:   # report the stored blob: the decoded offsets are in no file
                    what = (f"the storage record decoded from the {transforms.name(stored.transforms)} blob at "
                            f"[{location.offset}, {location.offset + location.length}) fails its")
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
