"""Where output bytes go: one `ShardSink` per shard file, and a `StagingDir` that makes the folder atomic.

Write at an offset, then close. The folder around the shards (staging, durability, resume, commit) is
`staging.StagingDir`. Whether a `FileSink` copies in-kernel (copy_file_range) is decided by its caller
(`fastpaths.py`), never by an error in the middle of a copy.
"""
from __future__ import annotations

import os
from typing import Protocol

from .crc import PieceCrcs
from ..errors import CheckpointError, OutputError
from ..fs.fastpaths import NONE, PREAD_STEP_BYTES, FastPaths, read_at
from ..fs import location
from ..fs.infiles import OpenFile
from ..fs.outfiles import create_new, open_ours, write_failed


class ShardSink(Protocol):
    def write_at(self, offset: int, data) -> None:
        """Write a bytes-like object at `offset`."""

    def copy_from(self, src: OpenFile, src_offset: int, dst_offset: int, length: int) -> None:
        """Copy `length` bytes of a source file (in-kernel when possible). Called only by a RangeReader's
        `copy_to`, which lends the open file for the call; everything else calls `reader.copy_to(sink, ...)`."""

    def note_source_crc32(self, dst_offset: int, length: int, crc: int) -> None:
        """The bytes about to be written or copied to [dst_offset, dst_offset + length), front to back, have this
        CRC-32 (from the checkpoint's zip directory), so the sink need not sum them or read them back (may do
        nothing). Called before the copy (`output.crc.PieceCrcs.expect` says why)."""

    def close(self) -> None:
        """Flush and close; the shard is complete."""


class ShardFile(ShardSink, Protocol):
    """A shard being written into the output (a `FileSink` on a disk, an `upload.UploadSink` into a bucket): the
    executor's `ShardSink`, plus what the writer of the whole file needs. Exactly one of `close` (every byte
    was written: the shard is complete) and `abort` (a failed run: what was written is dropped where it must be,
    e.g. a multipart upload) ends it."""

    def crc32(self) -> int:
        """The whole shard's CRC-32, after `close` (for its finished record in the resume ledger)."""

    def abort(self) -> None:
        """Stop without completing the shard (never publishes a partial object)."""


class MemorySink:
    """A shard held in a bytearray, for tests."""

    def __init__(self, nbytes: int):
        self.data = bytearray(nbytes)

    def write_at(self, offset: int, data) -> None:
        mv = memoryview(data).cast("B")
        self.data[offset:offset + len(mv)] = mv

    def copy_from(self, src: OpenFile, src_offset: int, dst_offset: int, length: int) -> None:
        data = src.pread(length, src_offset)
        if len(data) != length:
            raise OutputError(f"source ended early: wanted {length} bytes at offset {src_offset}, got {len(data)}")
        self.write_at(dst_offset, data)

    def note_source_crc32(self, dst_offset: int, length: int, crc: int) -> None:
        pass    # nothing is read back

    def close(self) -> None:
        pass


_COPY_STEP_BYTES = 1 << 30   # copy_file_range moves at most ~2 GiB per call
# With `fast.writeback`, the kernel is asked to start writing a shard's dirty pages each time this much more of
# it has been written (`OpenFile.start_writeback`): large enough that the call is rare, small enough that the
# disk starts early.
WRITEBACK_STEP_BYTES = 32 << 20


class FileSink:
    """A shard file, preallocated to its final size so writes at any offset land in place.

    `fast.copy_file_range` (the fast paths the run detected once; default none) copies unchanged bytes in-kernel; the caller turns
    it off where the source and output filesystems cannot (`fastpaths.probe_copy`). Either way every OSError
    is an OutputError naming the file and offset: a full disk or an IO error is never retried another way.
    """

    def __init__(self, path: str, nbytes: int, *, fast: FastPaths = NONE):
        self.path = path
        self.nbytes = nbytes
        self.fast = fast
        self.crcs = PieceCrcs()     # the file's CRC-32, built as bytes pass (see crc.py)
        self.writebacks_started = 0
        self._written_since_writeback = 0   # (workers writing one shard side by side may race on it: a
        try:                                # lost update only delays the next hint)
            self.fd = create_new(path)      # unlinks first: never writes through a symlink planted there
            os.ftruncate(self.fd, nbytes)
        except OSError as exc:
            raise OutputError(write_failed(path, exc, what="cannot create output file")) from None

    def write_at(self, offset: int, data) -> None:
        mv = memoryview(data).cast("B")
        self.crcs.add_bytes(offset, mv)
        done = 0
        try:
            while done < len(mv):
                done += os.pwrite(self.fd, mv[done:], offset + done)
        except OSError as exc:
            raise OutputError(write_failed(self.path, exc, offset + done)) from None
        self._wrote(done)

    def _wrote(self, nbytes: int) -> None:
        if not self.fast.writeback:
            return
        self._written_since_writeback += nbytes
        if self._written_since_writeback >= WRITEBACK_STEP_BYTES:
            self._written_since_writeback = 0
            self.writebacks_started += 1
            OpenFile(self.fd, self.path).start_writeback()

    def copy_from(self, src: OpenFile, src_offset: int, dst_offset: int, length: int) -> None:
        if self.fast.copy_file_range:
            self._copy_in_kernel(src, src_offset, dst_offset, length)
        else:
            copy_through_memory(self.path, self.write_at, src, src_offset, dst_offset, length)

    def _copy_in_kernel(self, src: OpenFile, src_offset: int, dst_offset: int, length: int) -> None:
        done = 0
        out = OpenFile(self.fd, self.path)
        try:
            while done < length:
                n = src.copy_range_to(out, min(length - done, _COPY_STEP_BYTES), src_offset + done, dst_offset + done)
                if n == 0:
                    raise ended_early(self.path, src_offset, dst_offset, length, done)
                done += n
        except OSError as exc:
            raise OutputError(write_failed(self.path, exc, dst_offset + done, what="copy failed")) from None
        finally:
            # Bytes copied in-kernel have a CRC unknown here (unless note_source_crc32 gave it beforehand).
            self.crcs.add(dst_offset, done, None)
        self._wrote(done)

    def note_source_crc32(self, dst_offset: int, length: int, crc: int) -> None:
        """The bytes about to be copied to [dst_offset, dst_offset + length) have this CRC-32 (the zip directory's)."""
        self.crcs.expect(dst_offset, length, crc)

    def crc32(self) -> int:
        """The whole file's CRC-32: combined from the pieces, reading back only ranges of unknown CRC."""
        try:
            fd = open_ours(self.path)
            try:
                back = OpenFile(fd, self.path)
                return self.crcs.total(self.nbytes, lambda offset, length: back.pread(length, offset))
            finally:
                os.close(fd)
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot read back: {exc.strerror or exc}") from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def abort(self) -> None:
        self.close()    # the partial file stays in the staging folder, which is discarded or resumed whole


def copy_through_memory(name: str, write_at, src: OpenFile, src_offset: int, dst_offset: int, length: int) -> None:
    """Copy `length` bytes of a source file into a sink (`write_at`, named `name` in errors) through one
    PREAD_STEP_BYTES bytes object at a time: the plain path of a local shard, and the only one of an upload."""
    done = 0
    while done < length:
        try:
            block = src.pread(min(length - done, PREAD_STEP_BYTES), src_offset + done)
        except OSError as exc:
            raise CheckpointError(f"{name}: copy failed at offset {dst_offset + done:,}: cannot read "
                                  f"the checkpoint at offset {src_offset + done:,}: {exc.strerror}") from None
        if not block:
            raise ended_early(name, src_offset, dst_offset, length, done)
        write_at(dst_offset + done, block)
        done += len(block)


def ended_early(name: str, src_offset: int, dst_offset: int, length: int, done: int) -> OutputError:
    return OutputError(f"{name}: source ended early while copying at offset {dst_offset + done:,}: "
                       f"wanted {length:,} bytes from source offset {src_offset:,}, got {done:,} "
                       "(was the checkpoint changed during the conversion?)")


class Mismatch(Exception):
    """Raised by ComparingSink at the first byte that differs; `offset` is that byte's offset in the file."""

    def __init__(self, path: str, offset: int):
        super().__init__(f"{path}: differs at byte {offset}")
        self.path = path
        self.offset = offset


COMPARE_PIECE_BYTES = 1 << 20   # what a ComparingSink reads back at a time


class ComparingSink:
    """A ShardSink that writes nothing: it compares every byte it is given with the same offset of `path`.

    Used to verify finished shards (`verify`, `convert --verify`) and tied weights, by running the executor
    again. Reads go into three buffers of `piece_bytes` allocated once (the file's bytes, the source's bytes
    for `copy_from`, the comparison flags): a fresh megabyte per piece would cost a page-faulting allocation.
    `fast.preadv` (the fast paths the run detected once; default none) reads into them in place; else pread and a
    copy.
    """

    def __init__(self, path: str, piece_bytes: int = COMPARE_PIECE_BYTES, *, fast: FastPaths = NONE):
        import numpy as np
        self.path = path
        self.fast = fast
        self.piece_bytes = piece_bytes
        # As carefully as a checkpoint file: a FIFO or device in the output is refused, never read forever. A URL
        # (an output in a bucket) is read with ranged GETs.
        self._file = location.open_file(path, error=OutputError)
        self.compared = 0
        self._theirs = np.empty(piece_bytes, dtype=np.uint8)
        self._source = np.empty(piece_bytes, dtype=np.uint8)
        self._flags = np.empty(piece_bytes, dtype=bool)

    def _read(self, file: OpenFile, into, offset: int) -> int:
        """Fill `into` from `file` at `offset`; returns how many bytes there were (fewer at the end of file)."""
        view = memoryview(into)
        done = 0
        while done < len(view):
            try:
                n = read_at(file, view[done:], offset + done, self.fast)
            except OSError as exc:      # an IO error is not a difference: it says nothing about the bytes
                if file is not self._file:
                    raise CheckpointError(f"cannot read the checkpoint at offset {offset + done:,} while comparing "
                                          f"with {self.path}: {exc.strerror or exc}") from None
                raise OutputError(f"{self.path}: cannot read at offset {offset + done:,}: "
                                  f"{exc.strerror or exc}") from None
            if n <= 0:
                break
            done += n
        return done

    def _expect(self, offset: int, data) -> None:
        n = len(data)
        got = self._read(self._file, self._theirs[:n], offset)
        theirs = self._theirs[:got]
        flags = self._flags[:got]
        import numpy as np
        np.not_equal(theirs, data[:got], out=flags)
        if got != n or flags.any():
            diff = np.flatnonzero(flags)
            raise Mismatch(self.path, offset + (int(diff[0]) if len(diff) else got))
        self.compared += n

    def write_at(self, offset: int, data) -> None:
        import numpy as np
        mine = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
        for start in range(0, len(mine), self.piece_bytes):
            self._expect(offset + start, mine[start:start + self.piece_bytes])

    def copy_from(self, src: OpenFile, src_offset: int, dst_offset: int, length: int) -> None:
        for start in range(0, length, self.piece_bytes):
            n = min(self.piece_bytes, length - start)
            if self._read(src, self._source[:n], src_offset + start) != n:
                raise OutputError(f"source ended early while comparing with {self.path}")
            self._expect(dst_offset + start, self._source[:n])

    def note_source_crc32(self, dst_offset: int, length: int, crc: int) -> None:
        pass    # every byte is compared anyway

    def close(self) -> None:
        """Close the file and let go of the buffers: a verify holds one sink at a time, not one per file."""
        self._file.close()
        self._theirs = self._source = self._flags = None
