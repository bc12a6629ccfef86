"""Where a checkpoint lives: a local folder or a prefix in object storage, behind one small interface.

Every question streamconv asks about the source folder itself (is it there, what does it hold, how big and which
version is each file, the bytes of a small side file) goes through `at(path_or_url)`, so the flavors, run-folder
discovery, the sidecars and the provenance fingerprint work the same on `s3://bucket/run/step-100` as on
`/data/run/step-100`. Data files are read through the range readers of `source/` (`source.remote` for URLs).

A file's `version` is what changes when the file is rewritten: (size, mtime_ns, ctime_ns, inode) locally, (size,
ETag or generation, last-modified) in object storage, compared before the commit so a checkpoint rewritten during
a run is never committed.
"""
from __future__ import annotations

import os
import posixpath
import stat
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Protocol, Tuple

from ..errors import CheckpointError
from . import fastpaths, remote, s3_obstore
from .infiles import OpenFile, open_regular

FILE, DIRECTORY, OTHER = "file", "directory", "other"
OBSTORE = "obstore"     # the FastPaths name that switches ObstoreFolder off


class Entry(NamedTuple):
    kind: str                 # FILE, DIRECTORY or OTHER (a FIFO, device or socket: never opened)
    size: int
    version: Tuple[Any, ...]  # equal before and after means the same file (see the module docstring)
    detail: str = ""          # for OTHER: what it is ("a FIFO (named pipe)")
    stamp: Tuple[Any, ...] = ()   # the short form a resume record keeps: (size, mtime_ns) or (size, ETag)


class Folder(Protocol):
    where: str      # the folder as messages name it: a path, or the URL

    def join(self, *names: str) -> str:
        """The path or URL of `names` inside this folder (what messages show, what `at` opens)."""

    def exists(self) -> bool:
        """Something is there (a folder, or a file where a folder was expected)."""

    def is_dir(self) -> bool:
        """A folder (in object storage: a prefix with objects under it)."""

    def names(self) -> List[str]:
        """The names directly inside (OSError when it cannot be listed)."""

    def folders(self) -> List[str]:
        """The names of the folders directly inside (symlinks to folders count; OSError when it cannot be listed)."""

    def entry(self, name: str) -> Optional[Entry]:
        """What `name` inside is, or None when absent."""

    def read_small(self, name: str, limit_bytes: int) -> bytes:
        """At most `limit_bytes` of a regular file inside (OSError/CheckpointError when it cannot be read)."""

    def read(self, name: str, offset: int, length: int) -> bytes:
        """At most `length` bytes at `offset` of a regular file inside (fewer at its end)."""


def at(path: str, error: Callable[[str], Exception] = CheckpointError) -> Folder:
    """The folder at a local path or a URL: s3:// through obstore when it can read it (`ObstoreFolder`), any
    other URL through fsspec (`RemoteFolder`). `error`: what a failing service raises (CheckpointError for the
    checkpoint, exit 2; OutputError for the output, exit 73)."""
    if not remote.is_url(path):
        return LocalFolder(path)
    store = s3_obstore.store_for(path) if remote.scheme(path) == "s3" and OBSTORE not in fastpaths.disabled() \
        else None
    return ObstoreFolder(path, store, error) if store is not None else RemoteFolder(path, error)


def absolute(path: str) -> str:
    """`os.path.abspath` for a local path; a URL as it is."""
    return path if remote.is_url(path) else os.path.abspath(path)


def parent_and_name(path: str) -> Tuple[str, str]:
    """(the folder holding `path`, its last name): `os.path.split` locally, on `/` for a URL."""
    if remote.is_url(path):
        head, _, tail = path.rstrip("/").rpartition("/")
        return head, tail
    return os.path.split(path)


def _kind(mode: int) -> Tuple[str, str]:
    if stat.S_ISREG(mode):
        return FILE, ""
    if stat.S_ISDIR(mode):
        return DIRECTORY, ""
    return OTHER, ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a device"
                   if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
                   else "not a regular file")


class LocalFolder:
    def __init__(self, path: str):
        self.where = os.fspath(path)

    def join(self, *names: str) -> str:
        return os.path.join(self.where, *names)

    def exists(self) -> bool:
        return os.path.exists(self.where)

    def is_dir(self) -> bool:
        return os.path.isdir(self.where)

    def names(self) -> List[str]:
        return os.listdir(self.where)

    def folders(self) -> List[str]:
        with os.scandir(self.where) as listing:
            return [e.name for e in listing if e.is_dir()]

    def entry(self, name: str) -> Optional[Entry]:
        try:
            st = os.stat(self.join(name))
        except FileNotFoundError:
            if os.path.lexists(self.join(name)):
                return Entry(OTHER, 0, (), "a symbolic link to a missing file")
            return None
        kind, detail = _kind(st.st_mode)
        return Entry(kind, st.st_size, (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino), detail,
                     (st.st_size, st.st_mtime_ns))

    def read_small(self, name: str, limit_bytes: int) -> bytes:
        return self.read(name, 0, limit_bytes)

    def read(self, name: str, offset: int, length: int) -> bytes:
        fd = open_regular(self.join(name))      # a FIFO is refused, never waited on
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)


class RemoteFolder:
    """A prefix in object storage (fsspec). Listings are asked of the service each time (no cache), so a
    fingerprint taken before the commit sees what is there now."""

    def __init__(self, url: str, error: Callable[[str], Exception] = CheckpointError):
        self.where = url.rstrip("/") if url.rstrip("/").partition("://")[2] else url
        self.fs, self.path = remote.filesystem(self.where)
        self.error = error

    def join(self, *names: str) -> str:
        return posixpath.join(self.where, *names)

    def _full(self, name: str) -> str:
        return posixpath.join(self.path, name) if name else self.path

    def _call(self, what: str, call):
        return remote.with_retries(what, call, self.error)

    def exists(self) -> bool:
        return self.is_dir() or self.entry("") is not None

    def is_dir(self) -> bool:
        self.fs.invalidate_cache(self.path)
        return bool(self._call(f"{self.where}: listing", lambda: self.fs.isdir(self.path)))

    def names(self) -> List[str]:
        self.fs.invalidate_cache(self.path)
        try:
            listed = self._call(f"{self.where}: listing", lambda: self.fs.ls(self.path, detail=False))
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.where}: no such folder") from None
        return sorted({posixpath.basename(p.rstrip("/")) for p in listed} - {""})

    def folders(self) -> List[str]:
        self.fs.invalidate_cache(self.path)
        try:
            listed = self._call(f"{self.where}: listing", lambda: self.fs.ls(self.path, detail=True))
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.where}: no such folder") from None
        return sorted({posixpath.basename(i["name"].rstrip("/")) for i in listed if i.get("type") == "directory"})

    def entry(self, name: str) -> Optional[Entry]:
        full = self._full(name)
        self.fs.invalidate_cache(posixpath.dirname(full))
        try:
            info = self._call(f"{self.join(name)}: status", lambda: self.fs.info(full))
        except FileNotFoundError:
            return None
        if info.get("type") == "directory":
            return Entry(DIRECTORY, 0, ())
        size = int(info.get("size") or 0)
        # GCS: the generation, not the etag (the MD5 of the bytes there): a re-upload of the same bytes is a new
        # object all the same, and a resume record keeps only (size, version)
        version = next((str(info[k]) for k in ("ETag", "generation", "etag", "md5Hash") if info.get(k)), "")
        modified = info.get("LastModified") or info.get("mtime") or info.get("updated") or info.get("created")
        return Entry(FILE, size, (size, version, str(modified or "")), "", (size, version))

    def read_small(self, name: str, limit_bytes: int) -> bytes:
        return self.read(name, 0, limit_bytes)

    def read(self, name: str, offset: int, length: int) -> bytes:
        full = self._full(name)

        def get() -> bytes:
            try:
                return self.fs.cat_file(full, start=offset, end=offset + length)
            except OSError as exc:      # s3fs: a range past the end (an empty file) is EINVAL; it is no bytes
                if "not satisfiable" in str(exc):
                    return b""
                raise
        return self._call(f"{self.join(name)}: read", get)


def _is_unsatisfiable_range(exc: BaseException) -> bool:
    return type(exc).__name__ == "GenericError" and "416" in str(exc).partition("\n")[0]


class ObstoreFolder:
    """A prefix in an S3 bucket through obstore (`at` picks it for s3:// unless STREAMCONV_NO_FAST_PATHS names
    obstore or `s3_obstore.store_for` finds it cannot read the URL as s3fs would). It answers what `RemoteFolder`
    answers through s3fs (the same sizes, ETags and last-modified times: HEAD's headers either way), so a
    fingerprint or a resume stamp is the same whichever client took it. Asked of the service each time (no cache)."""

    def __init__(self, url: str, store, error: Callable[[str], Exception] = CheckpointError):
        self.where = url.rstrip("/") if url.rstrip("/").partition("://")[2] else url
        self.bucket, self.key = s3_obstore.bucket_and_key(self.where)
        self.store, self.error = store, error

    def join(self, *names: str) -> str:
        return posixpath.join(self.where, *names)

    def _full(self, name: str) -> str:
        return posixpath.join(self.key, name).strip("/") if name else self.key

    def _call(self, what: str, call):
        return remote.with_retries(what, call, self.error)

    def exists(self) -> bool:
        return self.is_dir() or self.entry("") is not None

    def is_dir(self) -> bool:
        import obstore
        prefix = self.key + "/" if self.key else None

        def first():
            for batch in obstore.list(self.store, prefix=prefix, chunk_size=1):
                return bool(batch)
            return False
        return bool(self._call(f"{self.where}: listing", first))

    def _listing(self) -> Dict[str, Any]:
        import obstore
        listed = self._call(f"{self.where}: listing",
                            lambda: obstore.list_with_delimiter(self.store, self.key or None))
        if not listed["objects"] and not listed["common_prefixes"]:
            raise FileNotFoundError(f"{self.where}: no such folder")
        return listed

    def names(self) -> List[str]:
        listed = self._listing()
        found = [o["path"] for o in listed["objects"]] + list(listed["common_prefixes"])
        return sorted({posixpath.basename(p.rstrip("/")) for p in found} - {""})

    def folders(self) -> List[str]:
        return sorted({posixpath.basename(p.rstrip("/")) for p in self._listing()["common_prefixes"]} - {""})

    def entry(self, name: str) -> Optional[Entry]:
        import obstore
        full = self._full(name)
        try:
            meta = self._call(f"{self.join(name)}: status", lambda: obstore.head(self.store, full)) \
                if full else None
        except FileNotFoundError:
            meta = None
        if meta is None:
            inside = ObstoreFolder(self.join(name), self.store, self.error)
            return Entry(DIRECTORY, 0, ()) if inside.is_dir() else None
        size = int(meta["size"])
        version = str(meta.get("e_tag") or meta.get("version") or "")
        modified = meta.get("last_modified")
        return Entry(FILE, size, (size, version, str(modified or "")), "", (size, version))

    def read_small(self, name: str, limit_bytes: int) -> bytes:
        return self.read(name, 0, limit_bytes)

    def read(self, name: str, offset: int, length: int) -> bytes:
        import obstore
        full = self._full(name)
        if length <= 0:
            return b""

        def get() -> bytes:
            try:
                return bytes(obstore.get(self.store, full, options={"range": (offset, offset + length)}).bytes())
            except Exception as exc:    # obstore's GenericError: a range past the end (an empty file) is no bytes
                if _is_unsatisfiable_range(exc):
                    return b""
                raise
        return self._call(f"{self.join(name)}: read", get)


def entries(folder: str, names) -> "dict[str, Optional[Entry]]":
    """{name: its Entry, or None when absent (a dangling symlink too) or unreadable} for files in `folder`."""
    where = at(folder)
    out = {}
    for name in names:
        try:
            entry = where.entry(name)
        except OSError:
            entry = None
        out[name] = entry if entry is not None and entry.version else None
    return out


def metadata_names(folder: str) -> List[str]:
    """The `*.metadata` files directly in `folder` ([] when it cannot be listed)."""
    try:
        return [n for n in at(folder).names() if n.endswith(".metadata")]
    except OSError:
        return []


def glob_folders(pattern: str) -> List[str]:
    """The folders a glob names (`runs/*/checkpoint-*`, `s3://bucket/run/checkpoint-*`), in no particular order."""
    if not remote.is_url(pattern):
        import glob
        return [m for m in glob.glob(pattern) if os.path.isdir(m)]
    fs, path = remote.filesystem(pattern)
    found = remote.with_retries(f"{pattern}: listing", lambda: fs.glob(path, detail=True), CheckpointError)
    head = pattern[:len(pattern) - len(pattern.partition("://")[2])]      # "s3://"
    return [head + name.lstrip("/") if head != "memory://" else head + name
            for name, info in found.items() if info.get("type") == "directory"]


class LocalFile(OpenFile):
    """A regular local file open for reading at offsets (`open_file`), with its size when opened."""

    __slots__ = ("size",)

    def __init__(self, path: str, error: Callable[[str], Exception]):
        fd = open_regular(path, error=error)       # a FIFO or device is refused, never read
        super().__init__(fd, path)
        self.size = os.fstat(fd).st_size

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class RemoteFile:
    """An object open for reading at offsets (`open_file`): each read one ranged GET, retried."""

    def __init__(self, url: str, error: Callable[[str], Exception]):
        folder, name = parent_and_name(url)
        self._where, self._key, self.name = at(folder, error), name, url
        entry = self._where.entry(name)
        if entry is None:
            raise FileNotFoundError(url)
        if entry.kind != FILE:
            raise error(f"{url} is a folder (a prefix), not an object")
        self.size = entry.size

    def pread(self, length: int, offset: int) -> bytes:
        if offset >= self.size or length <= 0:
            return b""
        return self._where.read(self._key, offset, min(length, self.size - offset))

    def preadv(self, view: memoryview, offset: int) -> int:
        data = self.pread(len(view), offset)
        view[:len(data)] = data
        return len(data)

    def close(self) -> None:
        pass


def open_file(path: str, error: Callable[[str], Exception] = CheckpointError):
    """A file (a path) or an object (a URL) open for reading: `size`, `pread`, `preadv`, `close`.
    FileNotFoundError when absent; `error` when it is not a regular file or the service fails."""
    return RemoteFile(path, error) if remote.is_url(path) else LocalFile(path, error)
