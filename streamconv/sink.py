"""Where output bytes go: one `ShardSink` per shard file, and a `StagingDir` that makes the folder atomic.

Write at an offset, then commit or discard. Nothing is visible at the destination until
`StagingDir.commit()` renames the staging folder into place, after the index is written.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from typing import Dict, Optional, Protocol

from .errors import OutputError


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
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.ftruncate(self.fd, nbytes)
        except OSError as exc:
            raise OutputError(f"{path}: cannot create output file: {exc.strerror}") from None
        self._use_copy_file_range = hasattr(os, "copy_file_range")

    def write_at(self, offset: int, data) -> None:
        mv = memoryview(data).cast("B")
        done = 0
        try:
            while done < len(mv):
                done += os.pwrite(self.fd, mv[done:], offset + done)
        except OSError as exc:
            raise OutputError(f"{self.path}: write failed at offset {offset + done}: {exc.strerror}") from None

    def copy_from(self, src_fd: int, src_offset: int, dst_offset: int, length: int) -> None:
        done = 0
        try:
            while done < length:
                step = min(length - done, _COPY_STEP_BYTES)
                n = 0
                if self._use_copy_file_range:
                    try:
                        n = os.copy_file_range(src_fd, self.fd, step, src_offset + done, dst_offset + done)
                    except OSError:
                        # Cross-filesystem on old kernels, or a filesystem that refuses it: use pread/pwrite.
                        self._use_copy_file_range = False
                        n = 0
                if n == 0:
                    block = os.pread(src_fd, min(step, 8 << 20), src_offset + done)
                    if not block:
                        raise OutputError(f"{self.path}: source ended early while copying")
                    self.write_at(dst_offset + done, block)
                    n = len(block)
                done += n
        except OSError as exc:
            raise OutputError(f"{self.path}: copy failed at offset {dst_offset + done}: {exc.strerror}") from None

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


def _is_empty_dir(path: str) -> bool:
    return os.path.isdir(path) and not os.listdir(path)


class StagingDir:
    """A hidden folder beside the destination; renamed into place by `commit()`, removed by `discard()`.

    Use as a context manager: leaving the block with an exception (including KeyboardInterrupt)
    discards, so an interrupted run never leaves a folder that looks finished.
    """

    def __init__(self, destination: str, *, overwrite: bool = False):
        self.destination = os.path.abspath(os.fspath(destination))
        self.overwrite = overwrite
        if os.path.exists(self.destination) and not _is_empty_dir(self.destination):
            if not os.path.isdir(self.destination):
                raise OutputError(f"{self.destination} exists and is not a folder")
            if not overwrite:
                raise OutputError(
                    f"{self.destination} exists and is not empty; pass --overwrite to replace it, "
                    "or choose another output folder")
        parent = os.path.dirname(self.destination)
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"{parent}: cannot create: {exc.strerror}") from None
        base = os.path.basename(self.destination)
        self.path = os.path.join(parent, f".{base}.streamconv-{uuid.uuid4().hex[:8]}.partial")
        try:
            os.mkdir(self.path)
        except OSError as exc:
            raise OutputError(f"{parent}: cannot create staging folder: {exc.strerror}") from None
        self._done = False

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def write_json(self, name: str, obj: Dict) -> None:
        with open(self.file(name), "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")

    def commit(self) -> None:
        """Move the finished folder into place. The old destination (with --overwrite) goes only now."""
        if os.path.lexists(self.destination):
            if os.path.isdir(self.destination) and not os.path.islink(self.destination):
                old = self.path + ".old"
                os.rename(self.destination, old)
                os.rename(self.path, self.destination)
                shutil.rmtree(old, ignore_errors=True)
            else:
                raise OutputError(f"{self.destination} exists and is not a folder")
        else:
            os.rename(self.path, self.destination)
        self._done = True

    def discard(self) -> None:
        if not self._done:
            shutil.rmtree(self.path, ignore_errors=True)
            self._done = True

    def __enter__(self) -> "StagingDir":
        return self

    def __exit__(self, exc_type, exc, tb) -> Optional[bool]:
        if exc_type is not None:
            self.discard()
        elif not self._done:
            self.discard()   # left the block without commit(): treat as abandoned
        return None
