"""Which fast IO paths a run uses, decided once at start-up by capability, and their plain fallbacks.

    copy_file_range   in-kernel copy of unchanged tensor bytes into a shard      else pread/pwrite, 1 MiB steps
    preadv            scatter reads straight into the buffer                      else a pread loop (one copy more)
    fadvise           readahead hints (WILLNEED, RANDOM/NORMAL)                   else no hints
    renameat2         RENAME_NOREPLACE commit, RENAME_EXCHANGE for --overwrite    else rename (two for --overwrite)
    writeback         sync_file_range(WRITE): a shard's writeback starts as it is  else the shard's fsync does it all
                      written, so its fsync waits for the last pages only
    obstore           ranged GETs of an s3:// checkpoint through obstore (Rust)    else fsspec/s3fs

A path is used when the OS offers it and `STREAMCONV_NO_FAST_PATHS` (failpoints.py) does not turn it off (`1` or
`all`: every one; or a comma list of the names above). `convert` then probes copy_file_range between the real source and
output filesystems (`probe_copy`): only "not supported here" answers (EXDEV, ENOSYS, EOPNOTSUPP, EINVAL) turn
it off. The choice is passed down explicitly (constructor arguments), never consulted mid-copy: an error from a
fast path in the middle of a copy (EIO, ENOSPC) is reported, not retried another way.
"""
from __future__ import annotations

import errno
import importlib.util
import os
import threading
from dataclasses import dataclass, fields, replace
from typing import Mapping, Optional, Tuple

from .. import failpoints
from ..errors import CheckpointError, OptionsError, OutputError
from .infiles import OpenFile, libc_function, open_regular
from .outfiles import create_new, write_failed

PROBE_FILE_NAME = ".streamconv-probe"
# The plain paths read through a bytes object this large at most: memory beyond the buffer stays ~1 MiB a
# worker (8 MiB steps put a 4 MiB-buffer conversion 8 MiB over tests/memory/test_memory.py's bound).
PREAD_STEP_BYTES = 1 << 20
# What copy_file_range says when it cannot copy between these two files at all (as opposed to a failing disk).
_UNSUPPORTED = frozenset(e for e in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", None),
                                     errno.EINVAL) if e is not None)


@dataclass(frozen=True)
class FastPaths:
    copy_file_range: bool = False
    preadv: bool = False
    fadvise: bool = False
    renameat2: bool = False
    writeback: bool = False
    obstore: bool = False       # a client library, not a kernel call: source/object_clients.py says when it is used

    @property
    def names(self) -> Tuple[str, ...]:
        """The fast paths in use, for reports (`fast_paths` in `--json`)."""
        return tuple(f.name for f in fields(self) if getattr(self, f.name))


NONE = FastPaths()     # every plain fallback
ALL_NAMES = tuple(f.name for f in fields(FastPaths))


def disabled(environ: Optional[Mapping[str, str]] = None) -> frozenset:
    """The fast paths STREAMCONV_NO_FAST_PATHS turns off (in `environ`, default this process's environment)."""
    raw = failpoints.no_fast_paths(environ)
    value = raw.strip().lower()
    if value in ("", "0"):
        return frozenset()
    if value in ("1", "all"):
        return frozenset(ALL_NAMES)
    names = frozenset(n.strip() for n in value.split(",") if n.strip())
    unknown = sorted(names - set(ALL_NAMES))
    if unknown:
        raise OptionsError(f"{failpoints.NO_FAST_PATHS_ENV}={raw!r}: unknown fast path(s) {', '.join(unknown)}; "
                           f"use 1 or all (every one), or a comma list of {', '.join(ALL_NAMES)}")
    return names


def _has_renameat2() -> bool:
    return libc_function("renameat2") is not None


def detect(environ: Optional[Mapping[str, str]] = None) -> FastPaths:
    """Each fast path the OS offers and the environment does not turn off."""
    off = disabled(environ)
    return FastPaths(
        copy_file_range="copy_file_range" not in off and hasattr(os, "copy_file_range"),
        preadv="preadv" not in off and hasattr(os, "preadv"),
        fadvise="fadvise" not in off and hasattr(os, "posix_fadvise") and hasattr(os, "POSIX_FADV_WILLNEED"),
        renameat2="renameat2" not in off and _has_renameat2(),
        writeback="writeback" not in off and libc_function("sync_file_range") is not None,
        obstore="obstore" not in off and importlib.util.find_spec("obstore") is not None)


def for_source(fast: FastPaths, remote: bool) -> FastPaths:
    """The paths reading this source can use: a file's kernel paths, or (in object storage) the obstore client;
    what a run reports as `fast_paths`."""
    if remote:
        return replace(fast, copy_file_range=False, preadv=False, fadvise=False)
    return replace(fast, obstore=False)


def probe_copy(fast: FastPaths, source_path: str, folder: str) -> FastPaths:
    """`fast`, with copy_file_range off when it cannot copy from `source_path` into a file in `folder` (another
    filesystem on an older kernel, a filesystem that refuses it). Copies one byte into a probe file there,
    removed again. `folder` is a scratch folder that is never committed (`StagingDir.scratch_dir`): a run killed
    mid-probe must not leave the probe file to be published. Any other failure is a real problem with the output folder or the source, and raised."""
    if not fast.copy_file_range:
        return fast
    # One name per process and thread: shard jobs (batch, Ray tasks) probe the same staging folder side by side.
    probe_path = os.path.join(folder, f"{PROBE_FILE_NAME}-{os.getpid()}-{threading.get_ident()}")
    try:
        src = open_regular(source_path)
    except FileNotFoundError:
        raise CheckpointError(f"{source_path}: file named in .metadata is missing") from None
    try:
        try:
            dst = create_new(probe_path)     # never through a symlink planted under the name
        except OSError as exc:
            raise OutputError(f"{probe_path}: cannot create a file in the staging folder: {exc.strerror}") from None
        try:
            os.copy_file_range(src, dst, 1, 0, 0)
            failpoints.kill_point("copy-probe")
        except OSError as exc:
            if exc.errno in _UNSUPPORTED:
                return replace(fast, copy_file_range=False)
            raise OutputError(write_failed(probe_path, exc, 0, what=f"copying from {source_path} failed")) from None
        finally:
            os.close(dst)
            _remove(probe_path)
    finally:
        os.close(src)
    return fast


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError as exc:
        raise OutputError(f"{path}: cannot remove the probe file: {exc.strerror}") from None


def read_at(file: OpenFile, view: memoryview, offset: int, fast: FastPaths) -> int:
    """Read up to len(view) bytes at `offset` into `view` with one call; returns how many (0 at end of file,
    maybe fewer before it: callers loop). preadv reads in place; the fallback is pread of at most
    PREAD_STEP_BYTES and a copy."""
    if fast.preadv:
        return file.preadv(view, offset)
    data = file.pread(min(len(view), PREAD_STEP_BYTES), offset)
    view[:len(data)] = data
    return len(data)
