"""Small durable-file steps the output layer shares: fsync a path, CRC-32 of a file read back, and JSON records
read and written without following symlinks (written atomically, by rename)."""
from __future__ import annotations

import json
import os
from typing import Optional

from ..errors import OutputError
from ..failpoints import fsync_enabled
from ..fs.fastpaths import FastPaths, read_at
from ..fs.infiles import OpenFile
from ..fs.outfiles import NOFOLLOW, create_new, open_ours, write_failed
from .crc import crc32

_CRC_PIECE_BYTES = 8 << 20


def fsync_path(path: str, *, directory: bool = False) -> None:
    if not fsync_enabled():     # STREAMCONV_UNSAFE_NO_FSYNC (failpoints.py): benchmarks only
        return
    try:
        # A file of the staging folder is never reached through a symlink (or blocked on by a planted FIFO);
        # a folder may be (a parent folder named through a symlink is normal).
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else NOFOLLOW | os.O_NONBLOCK))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise OutputError(f"{path}: fsync failed: {exc.strerror}; the output may not be on disk") from None


def file_crc32(path: str, fast: FastPaths) -> int:
    """CRC-32 of a whole file, read in pieces (the shard was just written, so this reads the page cache)."""
    crc = 0
    buf = bytearray(_CRC_PIECE_BYTES)
    view = memoryview(buf)
    offset = 0
    try:
        fd = open_ours(path)    # never follows a symlink planted under a shard's name
    except OSError as exc:
        raise OutputError(f"{path}: cannot read back: {exc.strerror}") from None
    try:
        while True:
            n = read_at(OpenFile(fd, path), view, offset, fast)
            if n <= 0:
                return crc
            crc = crc32(view[:n], crc)
            offset += n
    except OSError as exc:
        raise OutputError(f"{path}: read back failed at offset {offset}: {exc.strerror}") from None
    finally:
        os.close(fd)


def read_json(path: str) -> Optional[dict]:
    """A record of ours, or None when missing or unreadable; OutputError when it is not ours (a symlink...)."""
    try:
        with os.fdopen(open_ours(path), encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def write_json_atomic(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    try:
        with os.fdopen(create_new(tmp), "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
        os.rename(tmp, path)    # replaces whatever had the name (a symlink itself, never its target)
    except OSError as exc:
        raise OutputError(write_failed(path, exc)) from None
