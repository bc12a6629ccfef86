"""The two small IO interfaces the rest of streamconv is written against.

* `RangeReader`: read a byte range of a file in the checkpoint folder.
* `ShardSink` (see `sink.py`): write at an offset, then commit or discard.

Keeping IO behind these lets the planner and executor be tested against memory as well as disk.
"""
from __future__ import annotations

import os
import threading
from typing import Dict, Optional, Protocol, Sequence

from .errors import CheckpointError


# preadv takes at most IOV_MAX (1024 on Linux) buffers per call.
_IOV_MAX = 1024


class RangeReader(Protocol):
    def size(self, relative_path: str) -> int:
        """Length in bytes of a file in the checkpoint folder (raises CheckpointError if missing)."""

    def read(self, relative_path: str, offset: int, length: int) -> bytes:
        """Exactly `length` bytes at `offset` (raises CheckpointError if the file is shorter)."""

    def read_into(self, relative_path: str, offset: int, buffers: Sequence[memoryview]) -> None:
        """Scatter-read consecutive bytes starting at `offset` into `buffers`, filling each in turn."""

    def copy_to(self, sink, relative_path: str, offset: int, dst_offset: int, length: int) -> None:
        """Copy a byte range into a ShardSink at `dst_offset` (in-kernel when both are files)."""


class MemoryReader:
    """A checkpoint folder held in a dict: {relative_path: bytes}. For tests."""

    def __init__(self, files: Dict[str, bytes]):
        self._files = files

    def size(self, relative_path: str) -> int:
        try:
            return len(self._files[relative_path])
        except KeyError:
            raise CheckpointError(f"{relative_path}: file is missing from the checkpoint") from None

    def read(self, relative_path: str, offset: int, length: int) -> bytes:
        data = self._files.get(relative_path)
        if data is None:
            raise CheckpointError(f"{relative_path}: file is missing from the checkpoint")
        out = data[offset:offset + length]
        if offset < 0 or len(out) != length:
            raise CheckpointError(
                f"{relative_path}: wanted {length} bytes at offset {offset}, file has {len(data)} bytes "
                "(truncated checkpoint?)")
        return out

    def read_into(self, relative_path: str, offset: int, buffers: Sequence[memoryview]) -> None:
        pos = offset
        for buf in buffers:
            n = len(buf)
            buf[:] = self.read(relative_path, pos, n)
            pos += n

    def copy_to(self, sink, relative_path: str, offset: int, dst_offset: int, length: int) -> None:
        sink.write_at(dst_offset, self.read(relative_path, offset, length))


class DirectoryReader:
    """Reads ranges with os.pread from files under `root`; keeps one fd per file open until close()."""

    def __init__(self, root: str):
        self.root = os.fspath(root)
        self._fds: Dict[str, int] = {}
        self._lock = threading.Lock()   # writer threads share one reader
        self._random_access = False

    def path(self, relative_path: str) -> str:
        # Refuse names that escape the checkpoint folder: relative_path comes from untrusted metadata.
        norm = os.path.normpath(relative_path)
        if os.path.isabs(norm) or norm.startswith(".."):
            raise CheckpointError(f"metadata names a file outside the checkpoint folder: {relative_path!r}")
        return os.path.join(self.root, norm)

    def fd(self, relative_path: str) -> int:
        fd = self._fds.get(relative_path)
        if fd is not None:
            return fd
        with self._lock:
            return self._open(relative_path)

    def _open(self, relative_path: str) -> int:
        fd = self._fds.get(relative_path)
        if fd is None:
            full = self.path(relative_path)
            try:
                fd = os.open(full, os.O_RDONLY)
            except FileNotFoundError:
                raise CheckpointError(
                    f"{full}: file named in .metadata is missing (incomplete copy of the checkpoint?)") from None
            except OSError as exc:
                raise CheckpointError(f"{full}: cannot open: {exc.strerror}") from None
            self._advise(fd)
            self._fds[relative_path] = fd
        return fd

    def prefetch(self, relative_path: str, offset: int, length: int) -> None:
        """Start reading a range into the page cache without waiting for it."""
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd(relative_path), offset, length, os.POSIX_FADV_WILLNEED)

    def set_random_access(self, random_access: bool) -> None:
        """Small scattered reads (locating chunks) vs long streams (copying). Readahead on thousands of 4 KiB
        header reads would otherwise pull in ~2% of the checkpoint for nothing on a cold cache."""
        self._random_access = random_access
        for fd in self._fds.values():
            self._advise(fd)

    def _advise(self, fd: int) -> None:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM if self._random_access else os.POSIX_FADV_NORMAL)

    def size(self, relative_path: str) -> int:
        return os.fstat(self.fd(relative_path)).st_size

    def read(self, relative_path: str, offset: int, length: int) -> bytes:
        fd = self.fd(relative_path)
        parts = []
        got = 0
        while got < length:
            try:
                part = os.pread(fd, length - got, offset + got)
            except OSError as exc:
                raise self._read_failed(relative_path, offset + got, exc) from None
            if not part:
                break
            parts.append(part)
            got += len(part)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        if len(data) != length:
            raise CheckpointError(
                f"{self.path(relative_path)}: wanted {length} bytes at offset {offset}, got {len(data)} "
                "(truncated checkpoint?)")
        return data

    def read_into(self, relative_path: str, offset: int, buffers: Sequence[memoryview]) -> None:
        fd = self.fd(relative_path)
        pending = [memoryview(b).cast("B") for b in buffers]
        first = 0      # pending[:first] are full
        pos = offset
        while first < len(pending):
            try:
                n = os.preadv(fd, pending[first:first + _IOV_MAX], pos)
            except OSError as exc:
                raise self._read_failed(relative_path, pos, exc) from None
            if n <= 0:
                raise CheckpointError(
                    f"{self.path(relative_path)}: file ends at offset {pos}, expected more data "
                    "(truncated checkpoint?)")
            pos += n
            # Skip the buffers filled completely; keep the unfilled tail of a partly filled one.
            while n and first < len(pending):
                if n >= len(pending[first]):
                    n -= len(pending[first])
                    first += 1
                else:
                    pending[first] = pending[first][n:]
                    n = 0

    def copy_to(self, sink, relative_path: str, offset: int, dst_offset: int, length: int) -> None:
        sink.copy_from(self.fd(relative_path), offset, dst_offset, length)

    def _read_failed(self, relative_path: str, offset: int, exc: OSError) -> CheckpointError:
        return CheckpointError(f"{self.path(relative_path)}: read failed at offset {offset:,}: {exc.strerror}")

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> "DirectoryReader":
        return self

    def __exit__(self, *exc) -> Optional[bool]:
        self.close()
        return None
