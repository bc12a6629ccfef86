"""Opening a file to read (a checkpoint file, a config file, an output read back) as a regular file only.

A FIFO, device or socket planted under an expected name must be refused, not read (a FIFO would block the run;
a device could stream forever). The reading side's counterpart of outfiles.py, below both io.py (range readers)
and fastpaths.py (the copy probe), which each open source files this way.
"""
from __future__ import annotations

import errno
import os
import stat

from ..errors import CheckpointError, ResourceError


def _kind(mode: int) -> str:
    for test, what in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return what
    return "not a regular file"


def open_regular(path: str, error=CheckpointError) -> int:
    """Open `path` read-only, refusing anything but a regular file (symlinks are followed to their target).

    O_NONBLOCK keeps a FIFO with no writer from blocking the open; fstat on the descriptor then decides, so a
    file swapped between a check and the open cannot slip through. `error` is the class raised for a file that
    is not regular or cannot be opened; running out of descriptors is a `ResourceError` either way.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            raise _out_of_descriptors(path) from None
        if exc.errno == errno.ENOENT:
            raise
        raise error(f"{path}: cannot open: {exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise error(f"{path} is {_kind(mode)}, not a regular file; streamconv reads and copies only "
                        "regular files (replace it with the real file)")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _out_of_descriptors(path: str) -> ResourceError:
    return ResourceError(
        f"{path}: cannot open: too many open files (this process may open {nofile_limit()}); raise the limit with "
        "`ulimit -n 4096` (or more) in the shell that runs streamconv")


def nofile_limit() -> int:
    """The soft limit on open descriptors (a large number when there is none or it cannot be read)."""
    try:
        import resource
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):     # not POSIX
        return 1 << 20
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


class OpenFile:
    """An open file lent across an interface instead of its descriptor (a reader's `copy_to` lends one to a sink;
    a sink lends its own output file to the copy). Its holder reads it at an offset or copies a range of it
    in-kernel; only the lender keeps and closes the descriptor."""

    __slots__ = ("_fd", "name")

    def __init__(self, fd: int, name: str):
        self._fd, self.name = fd, name

    def pread(self, length: int, offset: int) -> bytes:
        """Up to `length` bytes at `offset` (fewer at the end of the file); OSError as os.pread raises it."""
        return os.pread(self._fd, length, offset)

    def preadv(self, view: memoryview, offset: int) -> int:
        """Read into `view` in place with one call; how many bytes (0 at the end of the file)."""
        return os.preadv(self._fd, [view], offset)

    def copy_range_to(self, out: "OpenFile", length: int, offset: int, out_offset: int) -> int:
        """copy_file_range from this file into `out`: how many bytes moved (0 at the end of this file)."""
        return os.copy_file_range(self._fd, out._fd, length, offset, out_offset)

    def start_writeback(self) -> bool:
        """Ask the kernel to start writing this file's dirty pages to disk now, without waiting for them (Linux
        sync_file_range with SYNC_FILE_RANGE_WRITE over the whole file; the `writeback` fast path, fastpaths.py).
        Why: a shard smaller than the kernel's background-writeback threshold (10% of RAM by default) otherwise
        stays in the page cache until its fsync, which then waits for all of it after the last byte is written;
        started as the shard is written, the disk works while the copy goes on. Only a hint, never a durability
        step: the shard's fsync still makes it durable and reports any write error, so callers do not look at
        the answer (whether the kernel took the request: False for a pipe, say)."""
        global _sync_file_range
        if _sync_file_range is None:
            import ctypes
            function = libc_function("sync_file_range")
            function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
            function.restype = ctypes.c_int
            _sync_file_range = function
        return _sync_file_range(self._fd, 0, 0, _SYNC_FILE_RANGE_WRITE) == 0     # (offset 0, length 0: all of it)


_SYNC_FILE_RANGE_WRITE = 2      # <linux/fs.h>: start writing the range's dirty pages not yet under writeback
_sync_file_range = None


def libc_function(name: str):
    """The C library's function `name` through ctypes, or None (no ctypes, a platform where CDLL(None) means
    nothing, or a C library without it)."""
    try:
        import ctypes
        return getattr(ctypes.CDLL(None, use_errno=True), name, None)
    except (ImportError, OSError, TypeError):
        return None
