"""Reading a chunk's bytes by where they are: its blob (`BlobLocation`) and an offset in that blob's bytes.

The execution layer and the CRC-32 checker read chunks through one `BlobReader` per checkpoint, which they share.
Every address is honest:

* a **plain** blob's bytes are its file's own: the offset is a file offset inside the blob, and the read goes
  straight to the checkpoint's `RangeReader` (preadv, copy_file_range: the fast paths, unchanged);
* a **transformed** blob's bytes (`location.transform_descriptors`, e.g. zstd) are its decoded stream
  (`transforms.open_stream`): the offset is an offset in that stream, and the stream reads only the blob's stored
  range of its file. No decoded byte is given an address in a file.

Streams go forward only. Each thread keeps the streams it reads between reads (one, or as many as
`keeping(count)` says while a tensor's bands read `count` compressed chunks in turn: `planning.streams`, which
the predicted peak counts; each holds its window), so reads in increasing order (the copy path; bands in row
order) decode a blob once; a read before a stream's position decodes the blob again from its first byte (counted
in `restarts`: slower, never wrong). A stream is let go once it is past the chunk's storage record. When more
streams are read in turn than a thread keeps, the one it kept last is let go, not the oldest: bands reading N
chunks in turn with k kept decode N - k + 1 of them again per band, not all N (as dropping the oldest would).

`check_while_reading` sums a transformed blob's storage record as these reads pass it, so `--crc` costs one
zlib.crc32 pass instead of a second decompression; `record_crc32` reads a record and its recorded CRC-32 apart.
"""
from __future__ import annotations

import threading
import zlib
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple

from ..errors import CheckpointError
from ..model import BlobLocation, StoredTensor
from . import streamed_blob, transforms
from .io import RangeReader

DECODE_PIECE_BYTES = 1 << 20     # decoded bytes passed through memory at a time (per thread)
KEPT_STREAMS = 1                 # streams a thread keeps for its next read unless told more (`keeping`)

Verdict = Callable[[Optional[int], Optional[int]], None]    # (computed, recorded or None) -> raises on a mismatch


class _Cursor:
    """One blob's decoded stream, used by one thread at a time, and the record it sums as reads pass it."""

    __slots__ = ("location", "stream", "record_end", "sum_from", "sum_to", "crc", "kept_since")

    def __init__(self, location: BlobLocation, stream: transforms.DecodedStream, record_end: int):
        self.location, self.stream, self.record_end = location, stream, record_end
        self.sum_from = self.sum_to = self.crc = 0
        self.kept_since = 0         # when its thread first kept it (0: not yet), to choose which to let go

    @property
    def pos(self) -> int:
        return self.stream.pos

    def readinto(self, view: memoryview) -> None:
        first = self.stream.pos
        self.stream.readinto(view)
        a, b = max(first, self.sum_from), min(first + len(view), self.sum_to)
        if a < b:
            self.crc = zlib.crc32(view[a - first:b - first], self.crc)

    def skip_to(self, pos: int, scratch: memoryview) -> None:
        while self.stream.pos < pos:
            self.readinto(scratch[:min(len(scratch), pos - self.stream.pos)])


class BlobReader:
    """Chunk bytes by (blob location, offset in the blob's bytes), over the checkpoint's files `files`.
    `stored` is where each chunk is in its blob (`source.locate_all`); `names` the tensor to name in messages per
    transformed blob. Safe to share between threads. The caller closes `files`."""

    def __init__(self, files: RangeReader, stored: Mapping[BlobLocation, StoredTensor],
                 names: Optional[Mapping[BlobLocation, str]] = None):
        self.files = files
        self.stored = stored
        self.names = names or {}
        self._lock = threading.Lock()
        self._checks: Dict[BlobLocation, Verdict] = {}      # check_while_reading, not yet judged
        self._local = threading.local()
        self.decoded_bytes = 0      # decoded bytes produced (skipped ones included), for reports and tests
        self.restarts = 0           # reads that had to decode a blob again from its start (its stream was past
        #                             the read, or let go to keep no more streams than the thread may)

    # -- what the assemblers read through -------------------------------------------------------------------
    def read_into(self, location: BlobLocation, offset: int, buffers: Sequence[memoryview]) -> None:
        """Scatter-read the blob's bytes from `offset` on into `buffers`, filling each in turn."""
        if not location.transform_descriptors:
            self._check_in_blob(location, offset, sum(memoryview(b).nbytes for b in buffers))
            return self.files.read_into(location.relative_path, offset, buffers)
        cursor = self._cursor_at(location, offset)
        for buf in buffers:
            view = memoryview(buf).cast("B")
            cursor.readinto(view)
            self.decoded_bytes += len(view)
        self._done_with(cursor)

    def copy_to(self, sink, location: BlobLocation, offset: int, dst_offset: int, length: int) -> None:
        """Copy `length` of the blob's bytes from `offset` into a ShardSink at `dst_offset`: in-kernel for a plain
        blob when both are files, decoded through memory in DECODE_PIECE_BYTES pieces for a transformed one."""
        if not location.transform_descriptors:
            self._check_in_blob(location, offset, length)
            return self.files.copy_to(sink, location.relative_path, offset, dst_offset, length)
        cursor = self._cursor_at(location, offset)
        scratch = self._scratch()
        done = 0
        while done < length:
            piece = scratch[:min(len(scratch), length - done)]
            cursor.readinto(piece)
            sink.write_at(dst_offset + done, piece)
            done += len(piece)
        self.decoded_bytes += length
        self._done_with(cursor)

    def prefetch(self, location: BlobLocation, offset: int, length: int) -> None:
        """Hint: these bytes are read soon. A plain blob's are asked of the kernel; a stream is decoded when read."""
        if not location.transform_descriptors:
            self.files.prefetch(location.relative_path, offset, length)

    def announce(self, location: BlobLocation, offset: int, length: int) -> None:
        """Hint: this thread copies these bytes next, after those it announced before (`RangeReader.announce`)."""
        if not location.transform_descriptors:
            self.files.announce(location.relative_path, offset, length)

    @contextmanager
    def keeping(self, count: int) -> Iterator[None]:
        """While inside, this thread keeps up to `count` streams between its reads (a tensor whose bands read
        `count` compressed chunks in turn: `planning.streams.streams_kept`); afterwards it keeps KEPT_STREAMS
        again and lets go of the streams it kept (the tensor is written: none of them is read again)."""
        local = self._local
        local.capacity = max(1, count)
        try:
            yield
        finally:
            local.capacity = KEPT_STREAMS
            for cursor in self._kept().values():
                cursor.stream.close()
            self._kept().clear()
            self._let_go_early().clear()

    def kept_streams(self) -> int:
        """Streams this thread keeps now (each holds its window)."""
        return len(self._kept())

    # -- what the CRC-32 checker reads through --------------------------------------------------------------
    def record_crc32(self, location: BlobLocation, piece: memoryview) -> Tuple[Optional[int], Optional[int]]:
        """(computed, recorded) CRC-32 of the chunk's storage record, read in `piece`-sized steps; computed is None
        when there is nothing to compare with (no recorded CRC-32 for a plain blob, an empty record)."""
        stored = self.stored[location]
        if not stored.record_nbytes:
            return None, stored.crc32
        if not location.transform_descriptors:
            if stored.crc32 is None:
                return None, None
            return self._sum(location, stored.record_offset, stored.record_nbytes, piece), stored.crc32
        return self._sum(location, stored.record_offset, stored.record_nbytes, piece, descriptor=True)

    def check_while_reading(self, location: BlobLocation, verdict: Verdict) -> bool:
        """For a transformed blob: sum its storage record as the next reads pass it, then read the CRC-32 in the
        data descriptor after it and call `verdict(computed, recorded or None)` (True). A record never read to its
        end is never judged. For a plain blob False: its record costs no decompression to read apart."""
        stored = self.stored[location]
        if not location.transform_descriptors or not stored.record_nbytes:
            return False
        with self._lock:
            self._checks[location] = verdict
        cursor = self._kept().get(location)     # a stream kept by another thread is not summed: never judged
        if cursor is not None and cursor.pos <= stored.record_offset:     # it will pass the whole record: sum it
            cursor.sum_from, cursor.sum_to = stored.record_offset, cursor.record_end
        return True

    # -- internals -------------------------------------------------------------------------------------------
    def _check_in_blob(self, location: BlobLocation, offset: int, length: int) -> None:
        """A plain read must lie inside its blob (a safetensors blob's data follows its header)."""
        end = location.offset + location.length
        if offset < location.offset or (not location.tensor_key and offset + length > end):
            raise CheckpointError(
                f"{location.relative_path}: bytes [{offset}, {offset + length}) lie outside the blob at "
                f"[{location.offset}, {end}) they were asked of (internal error: please report)")

    def _sum(self, location: BlobLocation, offset: int, nbytes: int, piece: memoryview, descriptor: bool = False):
        """CRC-32 of `nbytes` at `offset`; with `descriptor`, (that, the CRC-32 the data descriptor after it holds),
        the descriptor read in the same call as the last piece (the stream is let go once past the record)."""
        crc, done, after = 0, 0, bytearray(streamed_blob.DESCRIPTOR_BYTES)
        while True:
            view = piece[:min(len(piece), nbytes - done)]
            last = done + len(view) == nbytes
            self.read_into(location, offset + done, [view, memoryview(after)] if last and descriptor else [view])
            crc = zlib.crc32(view, crc)
            done += len(view)
            if last:
                break
        if not descriptor:
            return crc
        return crc, streamed_blob.recorded_crc32(bytes(after), nbytes, location, self.names.get(location, ""))

    def _scratch(self) -> memoryview:
        scratch = getattr(self._local, "scratch", None)
        if scratch is None:
            scratch = self._local.scratch = memoryview(bytearray(DECODE_PIECE_BYTES))
        return scratch

    def _contexts(self) -> transforms.Contexts:
        """This thread's idle decoding contexts (a closed stream's, for the next it opens)."""
        contexts = getattr(self._local, "contexts", None)
        if contexts is None:
            contexts = self._local.contexts = transforms.Contexts()
        return contexts

    def _kept(self) -> Dict[BlobLocation, _Cursor]:
        """This thread's kept streams, oldest first."""
        kept = getattr(self._local, "kept", None)
        if kept is None:
            kept = self._local.kept = {}
        return kept

    def _let_go_early(self) -> set:
        """The blobs whose streams this thread let go before their record's end (to keep no more than its
        capacity), so that reading one again counts as a restart; emptied with the kept streams."""
        early = getattr(self._local, "early", None)
        if early is None:
            early = self._local.early = set()
        return early

    def _cursor_at(self, location: BlobLocation, pos: int) -> _Cursor:
        cursor = self._kept().pop(location, None)
        if cursor is None or cursor.pos > pos:
            if cursor is not None or location in self._let_go_early():
                self.restarts += 1
                self._let_go_early().discard(location)
            if cursor is not None:
                cursor.stream.close()
            stored = self.stored[location]
            where = transforms.where(location, self.names.get(location))
            cursor = _Cursor(location, transforms.open_stream(self.files, location, where, contexts=self._contexts()),
                             stored.record_offset + stored.record_nbytes)
            if location in self._checks:
                cursor.sum_from, cursor.sum_to = stored.record_offset, cursor.record_end
        start = cursor.pos
        cursor.skip_to(pos, self._scratch())
        self.decoded_bytes += pos - start
        return cursor

    def _done_with(self, cursor: _Cursor) -> None:
        self._judge(cursor)
        if cursor.pos >= cursor.record_end:
            cursor.stream.close()
            return      # past the chunk's record (and its CRC, read in the same call): nothing left to read
        kept = self._kept()     # (without `cursor`: a stream is taken out while read, so a failed read drops it)
        if not cursor.kept_since:
            self._local.kept_count = cursor.kept_since = getattr(self._local, "kept_count", 0) + 1
        if len(kept) >= getattr(self._local, "capacity", KEPT_STREAMS):
            # Full: let go of the stream kept last, not the oldest. Bands read their chunks in one cycle: the
            # oldest are read next, and those kept first stay kept; a stream read in pieces stays (it is this one).
            newest = max(kept.values(), key=lambda c: c.kept_since)
            del kept[newest.location]
            newest.stream.close()
            self._let_go_early().add(newest.location)
        kept[cursor.location] = cursor

    def _judge(self, cursor: _Cursor) -> None:
        """At the end of a record summed while reading: its descriptor, then the verdict."""
        if cursor.sum_to == 0 or cursor.pos != cursor.sum_to:
            return
        with self._lock:
            verdict = self._checks.pop(cursor.location, None)
        if verdict is None:
            return
        after = bytearray(streamed_blob.DESCRIPTOR_BYTES)
        cursor.readinto(memoryview(after))
        recorded = streamed_blob.recorded_crc32(bytes(after), cursor.sum_to - cursor.sum_from, cursor.location,
                                                self.names.get(cursor.location, ""))
        verdict(cursor.crc, recorded)
