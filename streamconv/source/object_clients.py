"""The clients a `RemoteReader`'s requests go through: obstore for `s3://` (the fast path), fsspec for every URL
(the fallback, and the only client of the other protocols).

Both answer the same two questions about an object of the checkpoint, named by its path relative to the
checkpoint's URL: its size (`head`), and the bytes of a range (`get`). `open_client` picks one from the run's
`FastPaths` (`obstore` is on when the package is importable and STREAMCONV_NO_FAST_PATHS does not turn it off)
and from what obstore can honour (`fs/s3_obstore.py`: an s3:// URL, storage options and credentials it reads as
s3fs would; gs:// works in obstore too, but no local GCS server tests it here: it stays on fsspec). The obstore
client shares its store (one connection pool) with the folder that lists the checkpoint (`location.ObstoreFolder`).

The obstore client sends every GET with `If-Match: <the ETag its HEAD saw>`, so an object re-uploaded during the
run fails the very next read (412) instead of being caught only before the commit. Neither client ever puts the
storage options into a message.
"""
from __future__ import annotations

from typing import Any, Dict, Protocol

from ..errors import CheckpointError
from ..fs import remote, s3_obstore
from ..fs.fastpaths import NONE, FastPaths

FSSPEC, OBSTORE = "fsspec", "obstore"


class ObjectClient(Protocol):
    name: str       # FSSPEC or OBSTORE (reports, pickling)

    def head(self, path: str) -> int:
        """The size of the object at `path` (FileNotFoundError when absent; CheckpointError for a folder)."""

    def get(self, path: str, start: int, end: int) -> Any:
        """The bytes [start, end) of the object (bytes or a buffer; fewer only if the object is shorter)."""


def open_client(url: str, fast: FastPaths = NONE) -> ObjectClient:
    """The client of the checkpoint at `url`: obstore when `uses_obstore(url, fast)`, else fsspec."""
    store = s3_obstore.store_for(url) if fast.obstore else None
    return ObstoreClient(url, store) if store is not None else FsspecClient(url)


def uses_obstore(url: str, fast: FastPaths) -> bool:
    """`fast.obstore` and obstore can honour the URL, the storage options and the credentials (module
    docstring): what `open_client` decides, asked once by a run for its report."""
    return bool(fast.obstore) and s3_obstore.store_for(url) is not None


class FsspecClient:
    """Any fsspec URL (s3fs, gcsfs, memory://...)."""

    name = FSSPEC

    def __init__(self, url: str):
        self.fs, self.prefix = remote.filesystem(url)
        self.url = url

    def _key(self, path: str) -> str:
        return f"{self.prefix}/{path}"

    def head(self, path: str) -> int:
        info = self.fs.info(self._key(path))
        if info.get("type") == "directory":
            raise CheckpointError(f"{self.url}/{path} is a folder, not a file; the checkpoint's data files are "
                                  "objects")
        return int(info.get("size") or 0)

    def get(self, path: str, start: int, end: int) -> Any:
        return self.fs.cat_file(self._key(path), start=start, end=end)


class ObstoreClient:
    """s3:// through obstore (object_store, Rust): requests run outside the GIL on its own connection pool."""

    name = OBSTORE

    def __init__(self, url: str, store):
        self.url, self.store = url, store
        self.prefix = s3_obstore.bucket_and_key(url)[1]
        self._etags: Dict[str, str] = {}

    def _key(self, path: str) -> str:
        return f"{self.prefix}/{path}" if self.prefix else path

    def head(self, path: str) -> int:
        import obstore
        meta = obstore.head(self.store, self._key(path))      # NotFoundError is a FileNotFoundError
        if meta.get("e_tag"):
            self._etags[path] = meta["e_tag"]
        return int(meta["size"])

    def get(self, path: str, start: int, end: int) -> Any:
        import obstore
        from obstore.exceptions import PreconditionError
        options: Dict[str, Any] = {"range": (start, end)}
        etag = self._etags.get(path)
        if etag:
            options["if_match"] = etag
        try:
            return obstore.get(self.store, self._key(path), options=options).bytes()
        except PreconditionError:
            raise CheckpointError(f"{self.url}/{path}: the checkpoint changed while it was converted (the "
                                  f"object's ETag is no longer {etag}); run again once it is complete") from None
