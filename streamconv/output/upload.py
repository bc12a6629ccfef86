"""A shard written straight into object storage: `UploadSink`, one multipart upload filled from the buffer.

The executor writes a shard at offsets, several workers side by side, each tensor in increasing offsets. The
shard is cut into parts of `part_bytes`; a part's buffer is allocated when its first byte arrives and uploaded
(and dropped) the moment its last byte has arrived, so parts go up in whatever order they fill, and nothing of
the model is staged on a local disk. Every byte passes through memory, so each part's CRC-32 is taken before
it goes and the object's CRC-32 is combined from them: nothing is read back.

Memory: the part buffers open at once, across every shard of the run, are counted by one `PartBudget`. Writers
fill their tensors front to back, so a worker holds about two parts at a time (the one it fills and the one
shared with the neighbouring tensor); the budget (`budget_parts`) allows twice the workers plus two, and a run
that would need more fails with OutputError instead of growing without bound. The plan's predicted peak
counts the budget beside `--buffer-size` (`upload_bytes`), as the ranged reads of a bucket source are, and the
client stack's own resident memory (`client_rss_bytes`, measured). A part is an anonymous mapping of its own
(`_Part`) handed to the client as a file (`s3_objects.BufferReader`; on GCS a memoryview), so neither malloc's
arenas nor the HTTP client keep copies of it.
"""
from __future__ import annotations

import functools
import mmap
import threading
from typing import Callable, Dict, List, Optional, Tuple

from ..errors import OutputError
from ..failpoints import kill_point
from ..fs.fastpaths import FastPaths
from ..fs.remote import is_url
from ..fs.infiles import OpenFile
from ..fs.objects import MAX_PARTS, MIN_PART_BYTES, max_parts, start_upload
from ..fs.objects import client_rss_bytes as store_client_rss_bytes
from ..sizes import format_size
from .crc import crc32, crc32_combine
from .sink import FileSink, ShardFile, copy_through_memory

PART_BYTES = 8 << 20    # S3's recommended part size; grown for a shard of more than MAX_PARTS of them


def part_bytes_for(nbytes: int, most_parts: int = MAX_PARTS) -> int:
    """The part size of a shard of `nbytes`: PART_BYTES, or more (whole MiB) so that it fits in `most_parts`
    (S3's 10,000; GCS composes at most 1,024)."""
    need = -(-nbytes // most_parts)
    return max(PART_BYTES, MIN_PART_BYTES, -(-need // (1 << 20)) * (1 << 20))


def budget_parts(workers: int) -> int:
    return 2 * max(1, workers) + 2


def upload_bytes(workers: int, largest_shard_bytes: int, most_parts: int = MAX_PARTS) -> int:
    """The most memory the part buffers of a run hold at once (beside --buffer-size)."""
    return budget_parts(workers) * min(part_bytes_for(largest_shard_bytes, most_parts), max(1, largest_shard_bytes))


def client_rss_bytes(url: str) -> int:
    """The client stack's own resident memory when the output is `url` (each store's measured term: s3fs, and
    obstore too since it lists the output prefix; gcsfs)."""
    return store_client_rss_bytes(url)


def shard_opener(staging_dir: str, fast: FastPaths, workers: int) -> Callable[[str, int], ShardFile]:
    """How the shards of a staging folder are opened (path or URL, size): files there, or uploads into a staging
    prefix in object storage, all of one process's uploads sharing one PartBudget."""
    if is_url(staging_dir):
        budget = PartBudget(budget_parts(workers))
        return lambda url, nbytes: UploadSink(url, nbytes, budget)
    return functools.partial(FileSink, fast=fast)


class PartBudget:
    """The part buffers open at once across every shard a process uploads; `peak` for the tests and report."""

    def __init__(self, max_parts: int):
        self.max_parts = max_parts
        self.open = self.peak = 0
        self._lock = threading.Lock()

    def take(self, url: str, part_bytes: int) -> None:
        with self._lock:
            if self.open >= self.max_parts:
                raise OutputError(
                    f"{url}: the writers hold {self.open} upload parts of {format_size(part_bytes)} open at once, "
                    "the most this run allows; write into the bucket with fewer --workers, or convert into a "
                    "local folder and upload it")
            self.open += 1
            self.peak = max(self.peak, self.open)

    def give(self, count: int = 1) -> None:
        with self._lock:
            self.open -= count


class _Part:
    """One part's buffer and the byte ranges of it written so far (merged).

    The buffer is an anonymous mapping of its own, unmapped when the part is dropped after its upload. From malloc
    (a bytearray), glibc serves the first part with mmap, then raises its mmap threshold past a part's size, and
    every later part comes from the writer thread's arena, which keeps the freed parts: 10-20 MiB more peak RSS
    writing 256 MiB into s3:// with 2 workers (docs/benchmarks.md)."""

    __slots__ = ("data", "covered")

    def __init__(self, length: int):
        self.data = mmap.mmap(-1, length) if length else bytearray(0)
        self.covered: List[List[int]] = []

    def add(self, start: int, end: int) -> bool:
        """Mark [start, end) written; True when the whole part is."""
        spans = sorted(self.covered + [[start, end]])
        merged = [spans[0]]
        for s, e in spans[1:]:
            if s <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], e)
            else:
                merged.append([s, e])
        self.covered = merged
        return merged == [[0, len(self.data)]]


class UploadSink:
    """A `sink.ShardFile` whose bytes go to the object `url` (see the module docstring)."""

    def __init__(self, url: str, nbytes: int, budget: PartBudget, part_bytes: Optional[int] = None):
        self.url = url
        self.nbytes = nbytes
        self.part_bytes = part_bytes or part_bytes_for(nbytes, max_parts(url))
        self.parts = max(1, -(-nbytes // self.part_bytes))
        self.budget = budget
        self._open: Dict[int, _Part] = {}
        self._crcs: Dict[int, Tuple[int, int]] = {}     # part index -> (length, CRC-32), once uploaded
        self._lock = threading.Lock()
        self._upload = start_upload(url)
        self._crc: Optional[int] = None

    def _length(self, index: int) -> int:
        return min(self.part_bytes, self.nbytes - index * self.part_bytes) if self.nbytes else 0

    def write_at(self, offset: int, data) -> None:
        mv = memoryview(data).cast("B")
        if offset < 0 or offset + len(mv) > self.nbytes:
            raise OutputError(f"{self.url}: a write of {len(mv)} bytes at offset {offset:,} is outside the shard's "
                              f"{self.nbytes:,} bytes; nothing was committed")
        done = 0
        while done < len(mv):
            index, start = divmod(offset + done, self.part_bytes)
            n = min(len(mv) - done, self._length(index) - start)
            full = self._fill(index, start, mv[done:done + n])
            if full is not None:
                self._send(index, full)
            done += n

    def _fill(self, index: int, start: int, piece: memoryview) -> Optional[_Part]:
        """Copy `piece` into part `index` at `start`; the part, taken out of the open ones, once it is full."""
        with self._lock:
            if index in self._crcs:
                raise OutputError(f"{self.url}: bytes at offset {index * self.part_bytes + start:,} written after "
                                  "their part was uploaded; nothing was committed")
            part = self._open.get(index)
            if part is None:
                self.budget.take(self.url, self.part_bytes)
                part = self._open[index] = _Part(self._length(index))
            part.data[start:start + len(piece)] = piece
            if not part.add(start, start + len(piece)):
                return None
            del self._open[index]
            self._crcs[index] = (len(part.data), -1)      # claimed: a late write to it is an error
            return part

    def _send(self, index: int, part: _Part) -> None:
        try:
            self._crcs[index] = (len(part.data), crc32(part.data))
            self._upload.put_part(index + 1, part.data)
        finally:
            self.budget.give()
        if len(self._crcs) < self.parts:
            kill_point("mid-upload")

    def copy_from(self, src: OpenFile, src_offset: int, dst_offset: int, length: int) -> None:
        copy_through_memory(self.url, self.write_at, src, src_offset, dst_offset, length)    # no file to copy into

    def note_source_crc32(self, dst_offset: int, length: int, crc: int) -> None:
        pass    # every byte passed through memory: each part's CRC-32 is exact already

    def close(self) -> None:
        """Complete the upload: the object appears, whole. Every byte must have been written."""
        if self._crc is not None:
            return
        if self.nbytes == 0:
            self._send(0, _Part(0))
        missing = [i for i in range(self.parts) if i not in self._crcs or self._crcs[i][1] < 0]
        if missing:
            first = missing[0] * self.part_bytes
            self.abort()
            raise OutputError(f"{self.url}: bytes from offset {first:,} were never written ({len(missing)} part(s) "
                              "incomplete); the shard was not uploaded and nothing was committed")
        self._upload.complete(self.parts)
        crc = 0
        for i in range(self.parts):
            length, part_crc = self._crcs[i]
            crc = crc32_combine(crc, part_crc, length)
        self._crc = crc

    def crc32(self) -> int:
        if self._crc is None:
            raise OutputError(f"{self.url}: the CRC-32 of a shard is known once its upload is complete")
        return self._crc

    def abort(self) -> None:
        with self._lock:
            held, self._open = len(self._open), {}
        self.budget.give(held)
        self._upload.abort()
