"""Writing into object storage: the only module (with gcs_objects.py, its verbs on GCS) that creates, copies or
deletes objects.

Object stores have no rename and no write at an offset, so a shard is one S3 multipart upload whose parts are
uploaded in any order as they fill (`MultipartUpload`: a part is readable by nobody until the upload is
completed, and an upload that will not be completed is aborted, never left holding billed storage). Small files
(records, the index, config.json) are one PUT (`put`); publishing a finished output is a server-side copy of
each object (`copy`: no byte passes through this machine) and the deletion of the staging objects (`delete`).
The run lock of an output prefix (output/remote_lock.py) is the one object written conditionally: created only
where none is (`put_new`, If-None-Match), replaced or deleted only while it is the version we read
(`put_replacing`, `delete_if`, If-Match): S3's conditional writes, atomic on the service.

S3 (and S3-protocol services: MinIO, Ceph, R2, through s3fs) and GCS (through gcsfs: `gcs_objects.py` does each
verb there, parts composed instead of a multipart upload, generations instead of ETags) are the outputs; another
protocol is refused (`check_writable`) with the protocols that work. A version (`put_new`'s answer, `get`'s
second value, what `put_replacing` and `delete_if` compare) is an S3 ETag or a GCS generation: opaque to callers.
Every call goes through `remote.with_retries` (a reset, a 5xx or throttling retried, then OutputError naming the
URL and the service's error, never the credentials).
"""
from __future__ import annotations

import io
import posixpath
from typing import Dict, List, Optional, Sequence, Tuple

from ..errors import OutputError
from . import gcs_objects, remote

GCS_PROTOCOLS = remote.GCS_PROTOCOLS
WRITABLE_PROTOCOLS = ("s3", "s3a") + GCS_PROTOCOLS
# S3's limits: parts of 5 MiB to 5 GiB (the last may be smaller), at most 10,000 per upload (GCS: 1,024 composed).
MIN_PART_BYTES = 5 << 20
MAX_PARTS = 10_000


def _on_gcs(url: str) -> bool:
    return remote.scheme(url) in GCS_PROTOCOLS


def max_parts(url: str) -> int:
    """The most parts one object at `url` may be uploaded in."""
    return gcs_objects.MAX_PARTS if _on_gcs(url) else MAX_PARTS


def check_writable(url: str) -> None:
    """OutputError (exit 73) for an output URL whose protocol streamconv cannot upload to."""
    if remote.scheme(url) not in WRITABLE_PROTOCOLS:
        raise OutputError(f"{url}: writing the output into {remote.scheme(url)}:// is not supported; an s3:// "
                          "URL is (S3 or any S3-protocol service: MinIO, Ceph, R2), and so is gs:// (Google Cloud "
                          "Storage). Convert into a local folder and upload it, or write to one of those")


def _client(url: str) -> Tuple[object, str, str]:
    """(the s3fs filesystem, bucket, key) of an object URL."""
    check_writable(url)
    fs, path = remote.filesystem(url)
    bucket, key, _ = fs.split_path(path)
    return fs, bucket, key


_call = remote.output_call


def start_upload(url: str):
    """A `MultipartUpload` (S3) or `gcs_objects.ComposedUpload` (GCS) of the object `url`: `put_part(number,
    data)` in any order, then `complete(parts)` (the object appears, whole) or `abort()`."""
    return gcs_objects.ComposedUpload(url) if _on_gcs(url) else MultipartUpload(url)


class MultipartUpload:
    """One object written as numbered parts, in any order; nothing is visible until `complete()`."""

    def __init__(self, url: str):
        self.url = url
        self._fs, self._bucket, self._key = _client(url)
        answer = _call(f"{url}: starting the upload",
                       lambda: self._fs.call_s3("create_multipart_upload", Bucket=self._bucket, Key=self._key))
        self._upload_id = answer["UploadId"]
        self._etags: Dict[int, str] = {}
        self.done = False

    def put_part(self, number: int, data) -> None:
        """Part `number` (from 1) holds `data` (any bytes-like object); a part uploaded again replaces itself (a
        retry is harmless)."""
        answer = _call(f"{self.url}: uploading part {number}", lambda: self._upload_part_once(number, data))
        self._etags[number] = answer["ETag"]

    def _upload_part_once(self, number: int, data) -> Dict:
        """One UploadPart request of `data` through s3fs's client, read from a fresh `BufferReader`, without s3fs's
        own retry loop: it sends the same Body again, which for a file already read to its end is a request whose
        body never comes (the run hung until the server timed out). botocore's own retries rewind the file, and
        `with_retries` (around this) makes a new one. The s3fs options of the call (`s3_additional_kwargs`: SSE
        keys, requester pays) are merged as `call_s3` merges them, and its errors translated as it does."""
        from fsspec.asyn import sync
        from s3fs.errors import translate_boto_error
        fs = self._fs

        async def send():
            await fs.set_session()
            method = (await fs.get_s3(self._bucket)).upload_part
            body = BufferReader(data)
            try:
                return await method(**fs._get_s3_method_kwargs(method, Bucket=self._bucket, Key=self._key,
                                                               UploadId=self._upload_id, PartNumber=number,
                                                               Body=body))
            except Exception as exc:    # botocore's ClientError as s3fs words it (the cause kept); others as they are
                translated = translate_boto_error(exc)
                if translated is exc:
                    raise
                raise translated from exc
            finally:
                body.close()    # the client's request objects outlive the call: they must not keep the part
        return sync(fs.loop, send)

    def complete(self, parts: int) -> None:
        """Publish the object from parts 1..`parts`, every one of which must have been uploaded."""
        missing = [n for n in range(1, parts + 1) if n not in self._etags]
        if missing:
            raise OutputError(f"{self.url}: parts {missing[:5]} were never uploaded; the object was not written")
        listed = [{"PartNumber": n, "ETag": self._etags[n]} for n in range(1, parts + 1)]
        _call(f"{self.url}: completing the upload",
              lambda: self._fs.call_s3("complete_multipart_upload", Bucket=self._bucket, Key=self._key,
                                       UploadId=self._upload_id, MultipartUpload={"Parts": listed}))
        self.done = True

    def abort(self) -> None:
        """Drop the parts uploaded so far (an upload neither completed nor aborted is billed until a lifecycle
        rule removes it). Best effort: a failure here must not hide the error that led to it."""
        if self.done:
            return
        self.done = True
        try:
            remote.with_retries(f"{self.url}: aborting the upload",
                                lambda: self._fs.call_s3("abort_multipart_upload", Bucket=self._bucket,
                                                         Key=self._key, UploadId=self._upload_id), OutputError)
        except (OutputError, FileNotFoundError):
            pass


class BufferReader(io.RawIOBase):
    """A part's buffer as a seekable file, read in the client's own small steps: no copy of the whole part.

    Handed a bytearray, the s3fs stack copied a part twice or three times while sending it (aiohttp: the payload's
    `value[:length]` slice and the join of the headers with the body, then asyncio's transport buffer for what the
    socket did not take at once); a file body is read 64 KiB at a time and hashed or checksummed 1 MiB at a time.
    Measured with tracemalloc (s3fs 2026.9, aiohttp 3.14, moto; 2026-12-07): 16-20 MiB allocated while one 8 MiB
    part went up from a bytearray, 8.5 from bytes, under 2 from this reader."""

    def __init__(self, data):
        self._view = memoryview(data).cast("B")
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def read(self, size: int = -1) -> bytes:
        end = len(self._view) if size is None or size < 0 else min(len(self._view), self._pos + size)
        piece = bytes(self._view[self._pos:end]) if end > self._pos else b""     # one copy of the step, no more
        self._pos += len(piece)
        return piece

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), len(self._view) - self._pos))
        buffer[:n] = self._view[self._pos:self._pos + n]
        self._pos += n
        return n

    def __len__(self) -> int:
        return len(self._view)

    def close(self) -> None:
        """Let go of the buffer (whoever still holds this reader no longer keeps the part's memory)."""
        if not self.closed:
            try:
                self._view.release()
            except BufferError:     # a slice of it still held somewhere: then it goes when that does
                pass
        super().close()


def put(url: str, data: bytes) -> None:
    """One small object (a record, the index, config.json) in one PUT."""
    if _on_gcs(url):
        return gcs_objects.put(url, data)
    fs, bucket, key = _client(url)
    _call(f"{url}: writing", lambda: fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data))


class NoConditionalWrites(OutputError):
    """The service answered a conditional write (If-None-Match / If-Match) with "not implemented"."""


# What a service answers when the object is not (or no longer) the version a conditional write names: 412
# PreconditionFailed, or 409 ConditionalRequestConflict while another conditional write to the key is in flight.
_LOST_RACE_CODES = ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")
_UNSUPPORTED_CODES = ("NotImplemented", "501")


def _service_code(exc: BaseException) -> str:
    """The service's error code (botocore's, which s3fs keeps as the cause of the error it raises), or ''."""
    for err in (exc, exc.__cause__):
        response = getattr(err, "response", None)
        if isinstance(response, dict):
            error = response.get("Error") or {}
            return str(error.get("Code") or (response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or "")
    return ""


def _conditional(what: str, call) -> Optional[Dict]:
    """`call()`'s answer, or None when its condition did not hold (another writer got there first)."""
    def attempt():
        try:
            return call()
        except FileExistsError:         # s3fs's word for a failed If-None-Match
            return None
        except Exception as exc:        # the client stacks raise many kinds; the service's code sorts them
            code = _service_code(exc)
            if code in _LOST_RACE_CODES:
                return None
            if code in _UNSUPPORTED_CODES:
                raise NoConditionalWrites(f"{what}: the storage service does not support conditional writes "
                                          f"({remote.describe(exc)})") from None
            raise
    return _call(what, attempt)


def put_new(url: str, data: bytes) -> Optional[str]:
    """PUT `data` at `url` only if no object is there (If-None-Match: *): its ETag, or None when one is."""
    if _on_gcs(url):
        return gcs_objects.put_new(url, data)
    fs, bucket, key = _client(url)
    answer = _conditional(f"{url}: creating", lambda: fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data,
                                                                 IfNoneMatch="*"))
    return None if answer is None else answer["ETag"]


def put_replacing(url: str, data: bytes, etag: str) -> Optional[str]:
    """PUT `data` at `url` only if the object there is still version `etag` (If-Match): the new ETag, or None
    when it was replaced or deleted meanwhile."""
    if _on_gcs(url):
        return gcs_objects.put_replacing(url, data, etag)
    fs, bucket, key = _client(url)
    answer = _conditional(f"{url}: replacing", lambda: fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data,
                                                                  IfMatch=etag))
    return None if answer is None else answer["ETag"]


def delete_if(url: str, etag: str) -> bool:
    """Delete the object at `url` only if it is still version `etag` (If-Match); False when it is not."""
    if _on_gcs(url):
        return gcs_objects.delete_if(url, etag)
    fs, bucket, key = _client(url)
    return _conditional(f"{url}: deleting", lambda: fs.call_s3("delete_object", Bucket=bucket, Key=key,
                                                               IfMatch=etag)) is not None


def get(url: str, max_bytes: int) -> Optional[Tuple[bytes, str]]:
    """(the bytes, an ETag) of a small object at `url`, or None when there is none; OutputError past `max_bytes`
    (a lock is a few hundred bytes). The ETag is read first: if the object is replaced between the two requests,
    the bytes are the newer version's and the ETag the older one's, so an If-Match write with that ETag fails
    and the caller reads again; the other mismatch cannot happen."""
    if _on_gcs(url):
        return gcs_objects.get(url, max_bytes)
    fs, _, _ = _client(url)
    _, path = remote.filesystem(url)

    def fetch():
        fs.invalidate_cache(path)
        try:
            info = fs.info(path)
            if int(info.get("size") or 0) > max_bytes:
                raise OutputError(f"{url}: {info['size']} bytes, more than the {max_bytes} expected there")
            return fs.cat_file(path), info["ETag"]
        except FileNotFoundError:
            return None
    return _call(f"{url}: reading", fetch)


def copy(src: str, dst: str) -> None:
    """Server-side copy of object `src` to `dst` (a multipart copy past 5 GB): no byte passes through here."""
    fs, _, _ = _client(dst)
    _, src_path = remote.filesystem(src)
    _, dst_path = remote.filesystem(dst)
    _call(f"{dst}: copying from {src}", lambda: fs.cp_file(src_path, dst_path))


def delete(urls: Sequence[str]) -> None:
    """Delete objects (absent ones are no error)."""
    if not urls:
        return
    fs, _, _ = _client(urls[0])
    paths = [remote.filesystem(u)[1] for u in urls]
    _call(f"{posixpath.dirname(urls[0])}: deleting {len(urls)} object(s)", lambda: fs.rm(paths))


def listing(prefix: str) -> Dict[str, int]:
    """{name relative to `prefix`: size} of every object under the prefix (sub-prefixes included)."""
    fs, _, _ = _client(prefix)
    _, path = remote.filesystem(prefix)
    fs.invalidate_cache(path)
    found = _call(f"{prefix}: listing", lambda: fs.find(path, detail=True))
    return {name[len(path) + 1:]: int(info.get("size") or 0) for name, info in found.items()
            if name.startswith(path + "/")}


def in_progress_uploads(prefix: str) -> List[Tuple[str, str]]:
    """(key, upload id) of the multipart uploads started under `prefix` and neither completed nor aborted."""
    if _on_gcs(prefix):
        return gcs_objects.in_progress_uploads(prefix)
    fs, bucket, key = _client(prefix)
    answer = _call(f"{prefix}: listing uploads in progress",
                   lambda: fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key.rstrip("/") + "/"))
    return [(u["Key"], u["UploadId"]) for u in answer.get("Uploads", [])]


def abort_uploads(prefix: str) -> int:
    """Abort every multipart upload in progress under `prefix` (a killed run's); how many there were."""
    if _on_gcs(prefix):
        return gcs_objects.abort_uploads(prefix)
    fs, bucket, _ = _client(prefix)
    found = in_progress_uploads(prefix)
    for key, upload_id in found:
        _call(f"{prefix}: aborting an interrupted upload",
              lambda: fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id))
    return len(found)
