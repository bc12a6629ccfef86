"""Where output bytes go: one `ShardSink` per shard file, and a `StagingDir` that makes the folder atomic.

Write at an offset, then close. The folder around the shards (staging, durability, resume, commit) is
`staging.StagingDir`.
"""
from __future__ import annotations

import errno
import os
from typing import Protocol

from .crc import PieceCrcs, pread_from
from .errors import OutputError
from .staging import StagingDir, write_failed  # noqa: F401  (StagingDir lived here before staging.py)


class ShardSink(Protocol):
    def write_at(self, offset: int, data) -> None:
        """Write a bytes-like object at `offset`."""

    def copy_from(self, src_fd: int, src_offset: int, dst_offset: int, length: int) -> None:
        """Copy `length` bytes from an open file descriptor (in-kernel when possible)."""

    def close(self) -> None:
        """Flush and close; the shard is complete."""


class MemorySink:
    """A shard held in a bytearray, for tests."""

    def __init__(self, nbytes: int):
        self.data = bytearray(nbytes)

    def write_at(self, offset: int, data) -> None:
        mv = memoryview(data).cast("B")
        self.data[offset:offset + len(mv)] = mv

    def copy_from(self, src_fd: int, src_offset: int, dst_offset: int, length: int) -> None:
        self.write_at(dst_offset, os.pread(src_fd, length, src_offset))

    def close(self) -> None:
        pass


_COPY_STEP_BYTES = 1 << 30   # copy_file_range moves at most ~2 GiB per call


class FileSink:
    """A shard file, preallocated to its final size so writes at any offset land in place."""

    def __init__(self, path: str, nbytes: int):
        self.path = path
        self.nbytes = nbytes
        self.crcs = PieceCrcs()     # the file's CRC-32, built as bytes pass (see crc.py)
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.ftruncate(self.fd, nbytes)
        except OSError as exc:
            raise OutputError(write_failed(path, exc, what="cannot create output file")) from None
        self._use_copy_file_range = hasattr(os, "copy_file_range")

    def write_at(self, offset: int, data) -> None:
        mv = memoryview(data).cast("B")
        self.crcs.add_bytes(offset, mv)
        done = 0
        try:
            while done < len(mv):
                done += os.pwrite(self.fd, mv[done:], offset + done)
        except OSError as exc:
            raise OutputError(write_failed(self.path, exc, offset + done)) from None

    def copy_from(self, src_fd: int, src_offset: int, dst_offset: int, length: int) -> None:
        done = 0
        in_kernel = 0       # bytes before `done` copied by copy_file_range since the last pread/pwrite piece
        try:
            while done < length:
                step = min(length - done, _COPY_STEP_BYTES)
                n = 0
                if self._use_copy_file_range:
                    try:
                        n = os.copy_file_range(src_fd, self.fd, step, src_offset + done, dst_offset + done)
                        in_kernel += n
                    except OSError as exc:
                        # Cross-filesystem on old kernels, or a filesystem that refuses it: use pread/pwrite.
                        # A full disk or an IO error is reported, not retried.
                        if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP,
                                             errno.ENOTSUP, errno.EBADF):
                            raise
                        self._use_copy_file_range = False
                        n = 0
                if n == 0:
                    block = os.pread(src_fd, min(step, 8 << 20), src_offset + done)
                    if not block:
                        raise OutputError(f"{self.path}: source ended early while copying")
                    self.crcs.add(dst_offset + done - in_kernel, in_kernel, None)
                    in_kernel = 0
                    self.write_at(dst_offset + done, block)
                    n = len(block)
                done += n
            # Bytes copied in-kernel have a CRC unknown here (note_source_crc32 may supply it).
            self.crcs.add(dst_offset + done - in_kernel, in_kernel, None)
        except OSError as exc:
            raise OutputError(write_failed(self.path, exc, dst_offset + done, what="copy failed")) from None

    def note_source_crc32(self, dst_offset: int, length: int, crc: int) -> None:
        """The bytes just copied to [dst_offset, dst_offset + length) have this CRC-32 (from the zip directory)."""
        self.crcs.replace(dst_offset, length, crc)

    def crc32(self) -> int:
        """The whole file's CRC-32: combined from the pieces, reading back only ranges of unknown CRC."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                return self.crcs.total(self.nbytes, pread_from(fd))
            finally:
                os.close(fd)
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot read back: {exc.strerror or exc}") from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


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
    """

    def __init__(self, path: str, piece_bytes: int = COMPARE_PIECE_BYTES):
        import numpy as np
        self.path = path
        self.piece_bytes = piece_bytes
        self.fd = os.open(path, os.O_RDONLY)
        self.compared = 0
        self._theirs = np.empty(piece_bytes, dtype=np.uint8)
        self._source = np.empty(piece_bytes, dtype=np.uint8)
        self._flags = np.empty(piece_bytes, dtype=bool)

    @staticmethod
    def _read(fd: int, into, offset: int) -> int:
        """Fill `into` from `fd` at `offset`; returns how many bytes there were (fewer at the end of file)."""
        view = memoryview(into)
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                break
            done += n
        return done

    def _expect(self, offset: int, data) -> None:
        n = len(data)
        got = self._read(self.fd, self._theirs[:n], offset)
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

    def copy_from(self, src_fd: int, src_offset: int, dst_offset: int, length: int) -> None:
        for start in range(0, length, self.piece_bytes):
            n = min(self.piece_bytes, length - start)
            if self._read(src_fd, self._source[:n], src_offset + start) != n:
                raise OutputError(f"source ended early while comparing with {self.path}")
            self._expect(dst_offset + start, self._source[:n])

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
