"""Writing into object storage: the only module callers ask to create, copy or delete objects, and the one place
an output URL's scheme picks its service (`store_for`): `s3_objects.S3Store` for s3:// (S3 and S3-protocol
services: MinIO, Ceph, R2), `gcs_objects.GCSStore` for gs://. Both implement `object_store.ObjectStore`, whose
docstring says what each verb promises; the functions here are those verbs on the store of the URL's scheme.

Object stores have no rename and no write at an offset, so a shard is one upload of parts in any order
(`start_upload`), small files one request (`put`), publishing a server-side copy of each object (`copy`) and the
deletion of the staging objects (`delete`); the run lock (output/remote_lock.py) is the one object written
conditionally (`put_new`, `put_replacing`, `delete_if`). Another protocol is refused (`check_writable`) with the
protocols that work.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

from ..errors import OutputError
from . import remote
from .gcs_objects import GCSStore
from .object_store import NoConditionalWrites, ObjectStore, Upload
from .s3_objects import MAX_PARTS, MIN_PART_BYTES, S3Store

__all__ = ["NoConditionalWrites", "ObjectStore", "Upload", "MAX_PARTS", "MIN_PART_BYTES", "store_for",
           "check_writable", "max_parts", "client_rss_bytes", "fsspec_rss_bytes", "start_upload", "put", "put_new",
           "put_replacing", "delete_if", "get", "copy", "delete", "listing", "in_progress_uploads", "abort_uploads"]

_S3, _GCS = S3Store(), GCSStore()
_STORES: Dict[str, ObjectStore] = {"s3": _S3, "s3a": _S3, "gs": _GCS, "gcs": _GCS}
WRITABLE_PROTOCOLS = tuple(_STORES)


def store_for(url: str) -> ObjectStore:
    """The store of the URL's scheme; OutputError (exit 73) for a protocol streamconv cannot upload to."""
    store = _STORES.get(remote.scheme(url))
    if store is None:
        raise OutputError(f"{url}: writing the output into {remote.scheme(url)}:// is not supported; an s3:// "
                          "URL is (S3 or any S3-protocol service: MinIO, Ceph, R2), and so is gs:// (Google Cloud "
                          "Storage). Convert into a local folder and upload it, or write to one of those")
    return store


def check_writable(url: str) -> None:
    store_for(url)


def max_parts(url: str) -> int:
    """The most parts one object at `url` may be uploaded in (S3: 10,000; GCS composes at most 1,024)."""
    return store_for(url).max_parts


def client_rss_bytes(url: str) -> int:
    """What the client stack writing into `url` keeps resident (fs/remote.py has the measurements)."""
    return store_for(url).client_rss_bytes


def fsspec_rss_bytes(url: str, default: int) -> int:
    """What the fsspec client of `url` alone keeps resident once it has read; `default` for a protocol no store
    writes to (memory://, file://...)."""
    store = _STORES.get(remote.scheme(url))
    return default if store is None else store.fsspec_rss_bytes


def start_upload(url: str) -> Upload:
    """An upload of the object `url`: `put_part(number, data)` in any order, then `complete(parts)` (the object
    appears, whole) or `abort()`."""
    return store_for(url).start_upload(url)


def put(url: str, data: bytes) -> None:
    store_for(url).put(url, data)


def put_new(url: str, data: bytes) -> Optional[str]:
    return store_for(url).put_new(url, data)


def put_replacing(url: str, data: bytes, version: str) -> Optional[str]:
    return store_for(url).put_replacing(url, data, version)


def delete_if(url: str, version: str) -> bool:
    return store_for(url).delete_if(url, version)


def get(url: str, max_bytes: int) -> Optional[Tuple[bytes, str]]:
    return store_for(url).get(url, max_bytes)


def copy(src: str, dst: str) -> None:
    store_for(dst).copy(src, dst)


def delete(urls: Sequence[str]) -> None:
    if urls:
        store_for(urls[0]).delete(urls)


def listing(prefix: str) -> Dict[str, int]:
    return store_for(prefix).listing(prefix)


def in_progress_uploads(prefix: str) -> List[Tuple[str, str]]:
    return store_for(prefix).in_progress_uploads(prefix)


def abort_uploads(prefix: str) -> int:
    return store_for(prefix).abort_uploads(prefix)
