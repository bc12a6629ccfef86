"""`ObjectStore` on Google Cloud Storage (gs://): the verbs on GCS's JSON API, through gcsfs.

GCS has what the output protocol needs, under other names:
* **Parts of any order**: no S3-style multipart upload (a resumable upload takes its bytes in order only, and the
  writers fill parts in any order), so each part is an object of its own, `<folder>/.streamconv-uploads/<name>/
  <upload id>/<part>`, and `complete` composes them into the shard (`compose`: up to 32 sources a request, so a
  tree of them for more; at most 1,024 components in all, `MAX_PARTS`), then deletes them. The shard appears in
  one step, whole, when the last compose returns; a killed run's parts are objects under its staging prefix
  (an obviously partial place), found by `in_progress_uploads` and deleted by `abort_uploads`, as S3's
  open uploads are aborted. A part uploaded again replaces itself.
* **Conditional writes**: every object has a generation; `ifGenerationMatch=0` creates only where nothing is
  (`put_new`), `ifGenerationMatch=<g>` replaces or deletes only that generation (`put_replacing`, `delete_if`),
  answered 412 otherwise (gcsfs: FileExistsError). The version `get` returns is the generation
  (`x-goog-generation` of the same answer as the bytes).
* Server-side copies (`rewriteTo`), listings and deletions are fsspec's own calls, shared with S3
  (`object_store.ObjectStore`).

Small objects (records, the lock, the index) are JSON-API multipart uploads (metadata and bytes in one request):
the upload type whose preconditions every GCS-protocol server honours (fake-gcs-server ignores them on a `media`
upload). A part is a `media` upload of the part's own buffer, which needs no precondition and no copy of its bytes.
"""
from __future__ import annotations

import json
import os
import posixpath
from typing import Dict, List, Optional, Tuple

from ..errors import OutputError
from . import remote
from .object_store import ObjectStore, Upload, call, client, missing_parts

UPLOADS_DIR = ".streamconv-uploads"     # beside the object being uploaded: its parts until they are composed
COMPOSE_SOURCES = 32                    # GCS's limit of source objects in one compose request
MAX_PARTS = 1024                        # GCS's limit of components in one composite object
_BOUNDARY = "==streamconv-part=="


def _upload(fs, bucket: str, key: str, data, **conditions) -> Dict:
    """One object in one multipart upload (JSON metadata, then the bytes); its resource (generation...)."""
    head = (f"--{_BOUNDARY}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n"
            f"{json.dumps({'name': key})}\r\n--{_BOUNDARY}\r\nContent-Type: application/octet-stream\r\n\r\n")
    body = b"".join((head.encode("utf-8"), bytes(data), f"\r\n--{_BOUNDARY}--".encode("utf-8")))
    return fs.call("POST", f"{fs._location}/upload/storage/v1/b/{bucket}/o", uploadType="multipart",
                   headers={"Content-Type": f'multipart/related; boundary="{_BOUNDARY}"'}, data=body,
                   json_out=True, **conditions)


def _upload_media(fs, bucket: str, key: str, data) -> Dict:
    """One object whose body is `data` itself (a part's buffer, handed to the HTTP client without a copy: as a
    memoryview, which aiohttp sends as it is and which slices without copying; an mmap it refuses)."""
    return fs.call("POST", f"{fs._location}/upload/storage/v1/b/{bucket}/o", uploadType="media", name=key,
                   headers={"Content-Type": "application/octet-stream"}, data=memoryview(data).cast("B"),
                   json_out=True)


def _conditional(what: str, request) -> Optional[Dict]:
    """`request()`'s answer, or None when its precondition failed (412: another writer got there first)."""
    def attempt():
        try:
            return request()
        except FileExistsError:     # gcsfs's word for 412 Precondition Failed
            return None
    return call(what, attempt)


class GCSStore(ObjectStore):
    max_parts = MAX_PARTS
    client_rss_bytes = remote.GCSFS_RSS_BYTES
    fsspec_rss_bytes = remote.GCSFS_RSS_BYTES

    def start_upload(self, url: str) -> Upload:
        return ComposedUpload(url)

    def put(self, url: str, data: bytes) -> None:
        fs, bucket, key = client(url)
        call(f"{url}: writing", lambda: _upload(fs, bucket, key, data))

    def put_new(self, url: str, data: bytes) -> Optional[str]:
        """(ifGenerationMatch=0)"""
        fs, bucket, key = client(url)
        answer = _conditional(f"{url}: creating", lambda: _upload(fs, bucket, key, data, ifGenerationMatch="0"))
        return None if answer is None else str(answer["generation"])

    def put_replacing(self, url: str, data: bytes, version: str) -> Optional[str]:
        fs, bucket, key = client(url)
        answer = _conditional(f"{url}: replacing",
                              lambda: _upload(fs, bucket, key, data, ifGenerationMatch=str(version)))
        return None if answer is None else str(answer["generation"])

    def delete_if(self, url: str, version: str) -> bool:
        """(ifGenerationMatch) The generation is compared first as well: a server that ignored the precondition
        on a DELETE (as fake-gcs-server does) would otherwise delete whatever is there."""
        found = self.get(url, 1 << 20)
        if found is None or found[1] != str(version):
            return False
        fs, bucket, key = client(url)

        def attempt():
            try:
                fs.call("DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=str(version))
                return True
            except FileNotFoundError:
                return None
        return _conditional(f"{url}: deleting", attempt) is not None

    def get(self, url: str, max_bytes: int) -> Optional[Tuple[bytes, str]]:
        """(from one answer: the bytes and its x-goog-generation)"""
        fs, bucket, key = client(url)

        def fetch():
            try:
                headers, body = fs.call("GET", "b/{}/o/{}", bucket, key, alt="media")
            except FileNotFoundError:
                return None
            if len(body) > max_bytes:
                raise OutputError(f"{url}: {len(body)} bytes, more than the {max_bytes} expected there")
            generation = headers.get("x-goog-generation")
            if not generation:
                raise OutputError(f"{url}: the storage service sent no x-goog-generation with the object")
            return bytes(body), str(generation)
        return call(f"{url}: reading", fetch)

    def in_progress_uploads(self, prefix: str) -> List[Tuple[str, str]]:
        """(every upload under `prefix` whose parts were never composed: a killed run's)"""
        fs, bucket, key = client(prefix)
        path = f"{bucket}/{key}".rstrip("/")
        fs.invalidate_cache(path)
        found = call(f"{prefix}: listing uploads in progress", lambda: fs.find(path))
        uploads = set()
        for name in found:
            folder, marker, rest = name[len(bucket) + 1:].partition(f"/{UPLOADS_DIR}/")
            if marker and rest.count("/") == 2:       # <name>/<upload id>/<part>
                target, upload_id, _ = rest.split("/")
                uploads.add((posixpath.join(folder, target), upload_id))
        return sorted(uploads)

    def abort_uploads(self, prefix: str) -> int:
        """(their parts deleted)"""
        fs, bucket, _ = client(prefix)
        found = self.in_progress_uploads(prefix)
        for key, upload_id in found:
            folder, name = posixpath.split(key)
            _delete_under(fs, bucket, posixpath.join(folder, UPLOADS_DIR, name, upload_id), prefix)
        return len(found)


class ComposedUpload(Upload):
    """One object written as numbered parts, in any order, each an object of its own until `complete()`
    composes them (see the module docstring)."""

    def __init__(self, url: str):
        self.url = url
        self._fs, self._bucket, self._key = client(url)
        folder, name = posixpath.split(self._key)
        self._parts_key = posixpath.join(folder, UPLOADS_DIR, name, os.urandom(6).hex())
        self._uploaded: Dict[int, str] = {}
        self.done = False

    def _part_key(self, number: int) -> str:
        return f"{self._parts_key}/{number:05d}"

    def put_part(self, number: int, data) -> None:
        if number > MAX_PARTS:
            raise OutputError(f"{self.url}: part {number} of more than the {MAX_PARTS} GCS composes into one object")
        key = self._part_key(number)
        call(f"{self.url}: uploading part {number}", lambda: _upload_media(self._fs, self._bucket, key, data))
        self._uploaded[number] = key

    def complete(self, parts: int) -> None:
        missing_parts(self.url, self._uploaded, parts)
        sources = [self._uploaded[n] for n in range(1, parts + 1)]
        level = 0
        while len(sources) > COMPOSE_SOURCES:       # a tree: groups of 32 into intermediate objects
            level += 1
            groups = [sources[i:i + COMPOSE_SOURCES] for i in range(0, len(sources), COMPOSE_SOURCES)]
            sources = [self._compose(group, f"{self._parts_key}/c{level}-{i:04d}") for i, group in enumerate(groups)]
        self._compose(sources, self._key)
        self.done = True
        _delete_under(self._fs, self._bucket, self._parts_key, self.url)

    def _compose(self, sources: List[str], key: str) -> str:
        request = {"kind": "storage#composeRequest", "sourceObjects": [{"name": s} for s in sources],
                   "destination": {"name": key}}
        call(f"{self.url}: composing {len(sources)} part(s)",
             lambda: self._fs.call("POST", "b/{}/o/{}/compose", self._bucket, key, json=request,
                                   headers={"Content-Type": "application/json"}, json_out=True))
        return key

    def abort(self) -> None:
        if self.done:
            return
        self.done = True
        try:
            _delete_under(self._fs, self._bucket, self._parts_key, self.url)
        except (OutputError, FileNotFoundError):
            pass


def _delete_under(fs, bucket: str, key_prefix: str, what: str) -> None:
    path = f"{bucket}/{key_prefix}"
    fs.invalidate_cache(path)
    found = call(f"{what}: listing its parts", lambda: fs.find(path))
    if found:
        call(f"{what}: deleting {len(found)} part(s)", lambda: fs.rm(found))
