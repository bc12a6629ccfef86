"""The two small IO interfaces the rest of streamconv is written against.

* `RangeReader`: read a byte range of a file in the checkpoint folder (its stored bytes; a transformed blob's
  decoded bytes are read by `blob_reader.BlobReader` over it, never given a file address).
* `ShardSink` (see `sink.py`): write at an offset, then commit or discard.

Keeping IO behind these lets the planner and executor be tested against memory as well as disk. Every method
the code calls is in the protocol (hints are no-ops where they mean nothing), so nothing is looked up by name.
Which fast paths (`preadv`, `posix_fadvise`) a `DirectoryReader` uses is decided by its caller (`fastpaths.py`).
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from contextlib import contextmanager
from typing import Dict, Iterator, Optional, Protocol, Sequence

from ..errors import CheckpointError, ResourceError
from ..fs.fastpaths import NONE, PREAD_STEP_BYTES, FastPaths
from ..fs.infiles import OpenFile, nofile_limit, open_regular


# preadv takes at most IOV_MAX (1024 on Linux) buffers per call.
_IOV_MAX = 1024
# Checkpoint files a DirectoryReader keeps open at once (an 11B model saved one file per item has ~3,500).
DEFAULT_MAX_OPEN_FILES = 256


class RangeReader(Protocol):
    def size(self, relative_path: str) -> int:
        """Length in bytes of a file in the checkpoint folder (raises CheckpointError if missing)."""

    def read(self, relative_path: str, offset: int, length: int) -> bytes:
        """Exactly `length` bytes at `offset` (raises CheckpointError if the file is shorter)."""

    def read_into(self, relative_path: str, offset: int, buffers: Sequence[memoryview]) -> None:
        """Scatter-read consecutive bytes starting at `offset` into `buffers`, filling each in turn."""

    def copy_to(self, sink, relative_path: str, offset: int, dst_offset: int, length: int) -> None:
        """Copy a byte range into a ShardSink at `dst_offset` (in-kernel when both are files)."""

    def prefetch(self, relative_path: str, offset: int, length: int) -> None:
        """Hint: this range is read soon; start fetching it without waiting (may do nothing)."""

    def announce(self, relative_path: str, offset: int, length: int) -> None:
        """Hint: this thread copies this range next, after the ranges it announced before (may do nothing: a
        reader of objects starts its GETs while the ranges before it are written)."""

    def set_random_access(self, random_access: bool) -> None:
        """Hint: small scattered reads follow (True) or long streams (False); may do nothing."""

    def close(self) -> None:
        """Let go of open files; no read follows."""


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

    def prefetch(self, relative_path: str, offset: int, length: int) -> None:
        pass    # already in memory

    def announce(self, relative_path: str, offset: int, length: int) -> None:
        pass

    def set_random_access(self, random_access: bool) -> None:
        pass

    def close(self) -> None:
        pass


def max_open_files() -> int:
    """Descriptors a DirectoryReader keeps open at most: DEFAULT_MAX_OPEN_FILES, or a quarter of the process's
    limit when that is lower (the rest is for output shards, the interpreter and the caller)."""
    return max(1, min(DEFAULT_MAX_OPEN_FILES, nofile_limit() // 4))


def _open_data_file(full: str) -> int:
    try:
        return open_regular(full)
    except FileNotFoundError:
        raise CheckpointError(
            f"{full}: file named in .metadata is missing (incomplete copy of the checkpoint?)") from None


class _Handle:
    """An open descriptor and how many callers are using it; closed only when idle and evicted."""

    __slots__ = ("fd", "users", "evicted")

    def __init__(self, fd: int):
        self.fd = fd
        self.users = 0
        self.evicted = False


class DirectoryReader:
    """Reads ranges with os.pread from regular files under `root`.

    Descriptors are cached (least recently used first out, at most `max_open`), so a checkpoint of thousands
    of files (`single_file_per_rank=False`) reads under any `ulimit -n`. Writer threads share one reader: a
    descriptor is closed only when no caller is using it, never under a copy. `fast` says whether to use
    preadv and posix_fadvise (the fast paths the run detected once; default none): without them, pread and no
    hints.
    """

    def __init__(self, root: str, max_open: Optional[int] = None, *, fast: FastPaths = NONE):
        self.root = os.fspath(root)
        self.fast = fast
        self.max_open = max_open if max_open is not None else max_open_files()
        self._cache: "OrderedDict[str, _Handle]" = OrderedDict()
        self._pinned: Dict[int, _Handle] = {}     # thread id -> the handle its last fd() call returned
        self._lock = threading.Lock()   # writer threads share one reader
        self._random_access = False

    def path(self, relative_path: str) -> str:
        # relative_path comes from untrusted metadata: refuse names that escape the checkpoint folder or that
        # the OS cannot take (a NUL byte, a lone surrogate), naming them instead of failing inside os.open.
        if not isinstance(relative_path, str) or not relative_path or "\x00" in relative_path:
            raise CheckpointError(f"metadata names an invalid data file {relative_path!r}")
        try:
            os.fsencode(relative_path)
        except UnicodeError:
            raise CheckpointError(f"metadata names a data file the filesystem cannot name: {relative_path!r}") from None
        norm = os.path.normpath(relative_path)
        if os.path.isabs(norm) or norm == os.pardir or norm.startswith(os.pardir + os.sep):
            raise CheckpointError(f"metadata names a file outside the checkpoint folder: {relative_path!r}")
        return os.path.join(self.root, norm)

    # -- descriptors ----------------------------------------------------------------------------------
    @contextmanager
    def borrow(self, relative_path: str) -> Iterator[int]:
        """An open descriptor of `relative_path`, guaranteed open until the block ends."""
        handle = self._acquire(relative_path)
        try:
            yield handle.fd
        finally:
            self._release(handle)

    def fd(self, relative_path: str) -> int:
        """An open descriptor of `relative_path`. It stays open until the calling thread's next `fd()` call (or
        `close()`): each thread holds at most one such descriptor, so a thread doing one read at a time may use
        it freely. Prefer `borrow()`, which says when the descriptor is done with."""
        handle = self._acquire(relative_path)
        ident = threading.get_ident()
        with self._lock:
            previous = self._pinned.get(ident)
            self._pinned[ident] = handle
        if previous is not None:
            self._release(previous)
        return handle.fd

    def _acquire(self, relative_path: str) -> _Handle:
        with self._lock:
            handle = self._cache.get(relative_path)
            if handle is not None:
                self._cache.move_to_end(relative_path)
                handle.users += 1
                return handle
        full = self.path(relative_path)
        fd = self._open(full)
        handle = _Handle(fd)
        handle.users = 1
        with self._lock:
            raced = self._cache.get(relative_path)
            if raced is not None:            # another thread opened it meanwhile: use theirs
                self._cache.move_to_end(relative_path)
                raced.users += 1
                os.close(fd)
                return raced
            self._cache[relative_path] = handle
            self._evict(self.max_open)
        self._advise(fd)
        return handle

    def _open(self, full: str) -> int:
        try:
            return _open_data_file(full)
        except ResourceError:
            # Out of descriptors: give back every idle one of ours and try once more.
            with self._lock:
                closed = self._evict(0)
            if not closed:
                raise
            return _open_data_file(full)

    def _evict(self, keep: int) -> int:
        """Close least recently used idle descriptors until at most `keep` remain cached (lock held). Busy ones
        leave the cache and are closed by their last user. Returns how many were closed now."""
        closed = 0
        while len(self._cache) > keep:
            _, handle = self._cache.popitem(last=False)
            handle.evicted = True
            if handle.users == 0:
                os.close(handle.fd)
                handle.fd = -1
                closed += 1
        return closed

    def _release(self, handle: _Handle) -> None:
        with self._lock:
            handle.users -= 1
            if handle.evicted and handle.users == 0 and handle.fd >= 0:
                os.close(handle.fd)
                handle.fd = -1

    def prefetch(self, relative_path: str, offset: int, length: int) -> None:
        """Start reading a range into the page cache without waiting for it."""
        if self.fast.fadvise:
            with self.borrow(relative_path) as fd:
                os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)

    def announce(self, relative_path: str, offset: int, length: int) -> None:
        pass    # the kernel reads ahead of a copy itself (WILLNEED on every chunk cost 0.3 s more system CPU at 2 GB)

    def set_random_access(self, random_access: bool) -> None:
        """Small scattered reads (locating chunks) vs long streams (copying). Readahead on thousands of 4 KiB
        header reads would otherwise pull in ~2% of the checkpoint for nothing on a cold cache."""
        self._random_access = random_access
        with self._lock:
            for handle in self._cache.values():
                self._advise(handle.fd)

    def _advise(self, fd: int) -> None:
        if self.fast.fadvise:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM if self._random_access else os.POSIX_FADV_NORMAL)

    def size(self, relative_path: str) -> int:
        with self.borrow(relative_path) as fd:
            return os.fstat(fd).st_size

    def read(self, relative_path: str, offset: int, length: int) -> bytes:
        parts = []
        got = 0
        with self.borrow(relative_path) as fd:
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
                if self.fast.preadv:
                    n = os.preadv(fd, pending[first:first + _IOV_MAX], pos)
                elif not len(pending[first]):
                    first += 1
                    continue
                else:   # plain pread, in steps so the extra copy stays small
                    data = os.pread(fd, min(len(pending[first]), PREAD_STEP_BYTES), pos)
                    n = len(data)
                    pending[first][:n] = data
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
        with self.borrow(relative_path) as fd:
            sink.copy_from(OpenFile(fd, self.path(relative_path)), offset, dst_offset, length)

    def _read_failed(self, relative_path: str, offset: int, exc: OSError) -> CheckpointError:
        return CheckpointError(f"{self.path(relative_path)}: read failed at offset {offset:,}: {exc.strerror}")

    def close(self) -> None:
        """Close every descriptor; call when no thread reads any more."""
        with self._lock:
            handles = list(self._cache.values()) + [h for h in self._pinned.values() if h.evicted]
            self._cache.clear()
            self._pinned.clear()
            for handle in {id(h): h for h in handles}.values():
                if handle.fd >= 0:
                    os.close(handle.fd)
                    handle.fd = -1

    def __enter__(self) -> "DirectoryReader":
        return self

    def __exit__(self, *exc) -> Optional[bool]:
        self.close()
        return None
