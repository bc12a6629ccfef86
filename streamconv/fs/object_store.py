"""The verbs an output in object storage needs, as one interface: `ObjectStore`, one implementation per service
(`s3_objects.S3Store`, `gcs_objects.GCSStore`), picked once per URL scheme by `objects.store_for`.

What a service must offer (docs/remote.md, "The commit protocol"): an object written as numbered parts uploaded in
any order and invisible until completed (`start_upload` -> `Upload`), small objects in one request (`put`), the
conditional writes of the run lock (`put_new`: only where nothing is; `put_replacing`, `delete_if`: only while it
is the version we read; `get`: bytes and version from one answer), and the uploads a killed run left open, found
and dropped (`in_progress_uploads`, `abort_uploads`). Server-side copies, deletions and listings are fsspec's own
calls, the same on every service (`copy`, `delete`, `listing` here). A version is an S3 ETag or a GCS generation:
opaque to callers.

Every call goes through `remote.output_call` (a reset, a 5xx or throttling retried, then OutputError naming the
URL and the service's error, never the credentials).
"""
from __future__ import annotations

import posixpath
from abc import ABC, abstractmethod
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..errors import OutputError
from . import remote

call = remote.output_call


class NoConditionalWrites(OutputError):
    """The service answered a conditional write (If-None-Match / If-Match) with "not implemented"."""


def client(url: str) -> Tuple[Any, str, str]:
    """(the fsspec filesystem, bucket, key) of an object URL."""
    fs, path = remote.filesystem(url)
    bucket, key, _ = fs.split_path(path)
    return fs, bucket, key


class Upload(ABC):
    """One object written as numbered parts, in any order; nothing is visible until `complete()`."""

    url: str
    done: bool

    @abstractmethod
    def put_part(self, number: int, data) -> None:
        """Part `number` (from 1) holds `data` (any bytes-like object); a part uploaded again replaces itself."""

    @abstractmethod
    def complete(self, parts: int) -> None:
        """Publish the object from parts 1..`parts`, every one of which must have been uploaded."""

    @abstractmethod
    def abort(self) -> None:
        """Drop the parts uploaded so far. Best effort: a failure here must not hide the error that led to it."""


def missing_parts(url: str, uploaded, parts: int) -> None:
    """OutputError when a part of 1..`parts` is not in `uploaded` (a shard must never be completed short)."""
    missing = [n for n in range(1, parts + 1) if n not in uploaded]
    if missing:
        raise OutputError(f"{url}: parts {missing[:5]} were never uploaded; the object was not written")


class ObjectStore(ABC):
    """A service's verbs on the objects of an output (module docstring)."""

    max_parts: int              # the most parts one object may be uploaded in
    client_rss_bytes: int       # what its client stack keeps resident once it has written (fs/remote.py)
    fsspec_rss_bytes: int       # ... and its fsspec client alone, when only that read a checkpoint

    @abstractmethod
    def start_upload(self, url: str) -> Upload:
        """An `Upload` of the object `url`."""

    @abstractmethod
    def put(self, url: str, data: bytes) -> None:
        """One small object (a record, the index, config.json) in one request."""

    @abstractmethod
    def put_new(self, url: str, data: bytes) -> Optional[str]:
        """Write `data` at `url` only if no object is there: its version, or None when one is."""

    @abstractmethod
    def put_replacing(self, url: str, data: bytes, version: str) -> Optional[str]:
        """Write `data` at `url` only while the object there is `version`: the new version, or None when it was
        replaced or deleted meanwhile."""

    @abstractmethod
    def delete_if(self, url: str, version: str) -> bool:
        """Delete the object at `url` only while it is `version`; False when it is not (or is gone)."""

    @abstractmethod
    def get(self, url: str, max_bytes: int) -> Optional[Tuple[bytes, str]]:
        """(the bytes, the version) of a small object, or None when there is none; OutputError past
        `max_bytes`."""

    @abstractmethod
    def in_progress_uploads(self, prefix: str) -> List[Tuple[str, str]]:
        """(key, upload id) of the uploads started under `prefix` and neither completed nor aborted."""

    @abstractmethod
    def abort_uploads(self, prefix: str) -> int:
        """Drop every upload in progress under `prefix` (a killed run's); how many there were."""

    def copy(self, src: str, dst: str) -> None:
        """Server-side copy of object `src` to `dst` (S3: a multipart copy past 5 GB; GCS: rewriteTo): no byte
        passes through here."""
        fs, _, _ = client(dst)
        _, src_path = remote.filesystem(src)
        _, dst_path = remote.filesystem(dst)
        call(f"{dst}: copying from {src}", lambda: fs.cp_file(src_path, dst_path))

    def delete(self, urls: Sequence[str]) -> None:
        """Delete objects (absent ones are no error)."""
        if not urls:
            return
        fs, _, _ = client(urls[0])
        paths = [remote.filesystem(u)[1] for u in urls]
        call(f"{posixpath.dirname(urls[0])}: deleting {len(urls)} object(s)", lambda: fs.rm(paths))

    def listing(self, prefix: str) -> Dict[str, int]:
        """{name relative to `prefix`: size} of every object under the prefix (sub-prefixes included)."""
        fs, _, _ = client(prefix)
        _, path = remote.filesystem(prefix)
        fs.invalidate_cache(path)
        found = call(f"{prefix}: listing", lambda: fs.find(path, detail=True))
        return {name[len(path) + 1:]: int(info.get("size") or 0) for name, info in found.items()
                if name.startswith(path + "/")}
