"""Opening files in a staging folder without trusting what is already there.

The staging folder sits beside the output, often in a shared scratch folder, and survives a killed run. Anyone
who can write that parent may plant a symlink under a shard's name pointing at the checkpoint (CWE-59): a plain
`open(O_TRUNC)` would then overwrite the source. So a file we create is unlinked first and created with O_EXCL
(which never follows a symlink), a file we read back is opened with O_NOFOLLOW and must be a regular file we
own, and running out of descriptors is a ResourceError (exit 71), never an OutputError. `write_failed` words
an OSError from writing any output file (with the free space when the disk is full).
"""
from __future__ import annotations

import errno
import os
import shutil
import stat
from typing import Optional

from ..errors import OutputError, ResourceError

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def out_of_descriptors(path: str) -> ResourceError:
    try:
        import resource
        limit = f" (this process may open {resource.getrlimit(resource.RLIMIT_NOFILE)[0]})"
    except (ImportError, OSError, ValueError):
        limit = ""
    return ResourceError(f"{path}: cannot open: too many open files{limit}; raise the limit with "
                         "`ulimit -n 4096` (or more) in the shell that runs streamconv")


def create_new(path: str) -> int:
    """A fresh, empty regular file at `path`, opened for writing. Whatever had that name (a shard of a killed
    run, a planted symlink) is unlinked first, never followed. Running out of descriptors is a ResourceError;
    any other failure an OSError for the caller to word."""
    try:
        try:
            os.unlink(path)         # a symlink is removed itself, not its target
        except FileNotFoundError:
            pass
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW | _CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            raise out_of_descriptors(path) from None
        raise


def open_ours(path: str, flags: int = os.O_RDONLY) -> int:
    """Open an existing file of the staging folder without following a symlink; it must be a regular file.
    (Who owns it is checked once, where a folder left by an earlier run is taken over: during a run, shard
    workers on other machines may write under another uid.) FileNotFoundError passes through (callers
    decide what a missing file means)."""
    try:
        fd = os.open(path, flags | NOFOLLOW | os.O_NONBLOCK | _CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            raise out_of_descriptors(path) from None
        if exc.errno == errno.ENOENT:
            raise
        if exc.errno == errno.ELOOP:
            raise OutputError(not_ours(path, "a symbolic link")) from None
        raise OutputError(f"{path}: cannot open: {exc.strerror}") from None
    try:
        problem = foreign(os.fstat(fd), owner=False)
        if problem:
            raise OutputError(not_ours(path, problem))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def foreign(st: os.stat_result, *, directory: bool = False, owner: bool = True) -> Optional[str]:
    """Why an entry of the staging folder is not one we may take over (None when it is); `owner`: it must
    also belong to this user."""
    if stat.S_ISLNK(st.st_mode):
        return "a symbolic link"
    if directory and not stat.S_ISDIR(st.st_mode):
        return "not a folder"
    if not directory and not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if owner and hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        return f"owned by another user (uid {st.st_uid})"
    return None


def not_ours(path: str, problem: str) -> str:
    return (f"{path} is {problem}; streamconv did not make it and will not write through or publish it. "
            "Remove it (or the whole staging folder: run again with --discard-partial) and run again")


def write_failed(path: str, exc: OSError, offset: Optional[int] = None, what: str = "write failed") -> str:
    """The message for an OSError while writing `path`: file, offset, and free space when the disk is full."""
    where = f" at offset {offset:,}" if offset is not None else ""
    message = f"{path}: {what}{where}: {exc.strerror}"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        message += f" ({free_space_note(path)})"
    return message


def free_space_note(path: str) -> str:
    probe = os.path.dirname(path)
    try:
        free = shutil.disk_usage(probe).free
        vfs = os.statvfs(probe)
    except OSError:
        return "free some space or choose another folder"
    # ENOSPC with bytes to spare: the filesystem ran out of inodes (f_files == 0: it does not count them)
    if vfs.f_files and vfs.f_favail == 0:
        return (f"no free inodes on {probe} although {free:,} bytes are free; delete some files there "
                "or choose another folder")
    return f"{free:,} bytes free on {probe}; free some space or choose another folder"
