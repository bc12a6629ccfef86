"""`ObjectStore` on S3 and S3-protocol services (MinIO, Ceph, R2), through s3fs's botocore client.

A shard is one S3 multipart upload whose parts are uploaded in any order as they fill (`MultipartUpload`: a part is
readable by nobody until the upload is completed, and an upload that will not be completed is aborted, never left
holding billed storage). The run lock's conditional writes are S3's own: `If-None-Match: *` creates only where
nothing is, `If-Match: <ETag>` replaces or deletes only that version, atomic on the service; a version is an ETag.
"""
from __future__ import annotations

import io
from typing import Any, Dict, List, Optional, Tuple

from ..errors import OutputError
from . import remote
from .object_store import NoConditionalWrites, ObjectStore, Upload, call, client, missing_parts

# S3's limits: parts of 5 MiB to 5 GiB (the last may be smaller), at most 10,000 per upload.
MIN_PART_BYTES = 5 << 20
MAX_PARTS = 10_000


class S3Store(ObjectStore):
    max_parts = MAX_PARTS
    # s3fs, and obstore too since it lists the output prefix (fs/location.py)
    client_rss_bytes = remote.S3FS_RSS_BYTES + remote.OBSTORE_RSS_BYTES
    fsspec_rss_bytes = remote.S3FS_RSS_BYTES

    def start_upload(self, url: str) -> Upload:
        return MultipartUpload(url)

    def put(self, url: str, data: bytes) -> None:
        fs, bucket, key = client(url)
        call(f"{url}: writing", lambda: fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data))

    def put_new(self, url: str, data: bytes) -> Optional[str]:
        fs, bucket, key = client(url)
        answer = _conditional(f"{url}: creating", lambda: fs.call_s3("put_object", Bucket=bucket, Key=key,
                                                                     Body=data, IfNoneMatch="*"))
        return None if answer is None else answer["ETag"]

    def put_replacing(self, url: str, data: bytes, version: str) -> Optional[str]:
        fs, bucket, key = client(url)
        answer = _conditional(f"{url}: replacing", lambda: fs.call_s3("put_object", Bucket=bucket, Key=key,
                                                                      Body=data, IfMatch=version))
        return None if answer is None else answer["ETag"]

    def delete_if(self, url: str, version: str) -> bool:
        fs, bucket, key = client(url)
        return _conditional(f"{url}: deleting", lambda: fs.call_s3("delete_object", Bucket=bucket, Key=key,
                                                                   IfMatch=version)) is not None

    def get(self, url: str, max_bytes: int) -> Optional[Tuple[bytes, str]]:
        """The ETag is read first: if the object is replaced between the two requests, the bytes are the newer
        version's and the ETag the older one's, so an If-Match write with that ETag fails and the caller reads
        again; the other mismatch cannot happen."""
        fs, _, _ = client(url)
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
        return call(f"{url}: reading", fetch)

    def in_progress_uploads(self, prefix: str) -> List[Tuple[str, str]]:
        fs, bucket, key = client(prefix)
        answer = call(f"{prefix}: listing uploads in progress",
                      lambda: fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key.rstrip("/") + "/"))
        return [(u["Key"], u["UploadId"]) for u in answer.get("Uploads", [])]

    def abort_uploads(self, prefix: str) -> int:
        fs, bucket, _ = client(prefix)
        found = self.in_progress_uploads(prefix)
        for key, upload_id in found:
            call(f"{prefix}: aborting an interrupted upload",
                 lambda: fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id))
        return len(found)


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


def _conditional(what: str, request) -> Optional[Dict]:
    """`request()`'s answer, or None when its condition did not hold (another writer got there first)."""
    def attempt():
        try:
            return request()
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
    return call(what, attempt)


def request_kwargs(fs, s3_client, operation: str, **kwargs) -> Dict[str, Any]:
    """The keyword arguments of one botocore `operation` ("UploadPart") as s3fs's own `call_s3` would send them:
    the filesystem's `s3_additional_kwargs` (SSE-C keys...) and requester-pays setting, then `kwargs`, keeping only
    the parameters the operation takes (botocore's service model says which). Built here from public attributes
    because s3fs's own merge (`S3FileSystem._get_s3_method_kwargs`) is private; tests/fs/test_s3_objects.py checks
    the two agree, so a change in s3fs is noticed there."""
    merged = dict(fs.s3_additional_kwargs)
    if fs.requester_pays:
        merged["RequestPayer"] = "requester"
    merged.update(kwargs)
    shape = s3_client.meta.service_model.operation_model(operation).input_shape
    accepted = set(shape.members) if shape is not None else set()
    return {k: v for k, v in merged.items() if k in accepted}


class MultipartUpload(Upload):
    """One object written as numbered parts, in any order; nothing is visible until `complete()`."""

    def __init__(self, url: str):
        self.url = url
        self._fs, self._bucket, self._key = client(url)
        answer = call(f"{url}: starting the upload",
                      lambda: self._fs.call_s3("create_multipart_upload", Bucket=self._bucket, Key=self._key))
        self._upload_id = answer["UploadId"]
        self._etags: Dict[int, str] = {}
        self.done = False

    def put_part(self, number: int, data) -> None:
        answer = call(f"{self.url}: uploading part {number}", lambda: self._upload_part_once(number, data))
        self._etags[number] = answer["ETag"]

    def _upload_part_once(self, number: int, data) -> Dict:
        """One UploadPart request of `data` through s3fs's client, read from a fresh `BufferReader`, without s3fs's
        own retry loop: it sends the same Body again, which for a file already read to its end is a request whose
        body never comes (the run hung until the server timed out). botocore's own retries rewind the file, and
        `call` (around this) makes a new one. The s3fs options of the call are merged as `call_s3` merges them
        (`request_kwargs`), and its errors translated as it does."""
        from fsspec.asyn import sync
        from s3fs.errors import translate_boto_error
        fs = self._fs

        async def send():
            await fs.set_session()
            s3_client = await fs.get_s3(self._bucket)
            body = BufferReader(data)
            try:
                return await s3_client.upload_part(**request_kwargs(
                    fs, s3_client, "UploadPart", Bucket=self._bucket, Key=self._key, UploadId=self._upload_id,
                    PartNumber=number, Body=body))
            except Exception as exc:    # botocore's ClientError as s3fs words it (the cause kept); others as they are
                translated = translate_boto_error(exc)
                if translated is exc:
                    raise
                raise translated from exc
            finally:
                body.close()    # the client's request objects outlive the call: they must not keep the part
        return sync(fs.loop, send)

    def complete(self, parts: int) -> None:
        missing_parts(self.url, self._etags, parts)
        listed = [{"PartNumber": n, "ETag": self._etags[n]} for n in range(1, parts + 1)]
        call(f"{self.url}: completing the upload",
             lambda: self._fs.call_s3("complete_multipart_upload", Bucket=self._bucket, Key=self._key,
                                      UploadId=self._upload_id, MultipartUpload={"Parts": listed}))
        self.done = True

    def abort(self) -> None:
        """(an upload neither completed nor aborted is billed until a lifecycle rule removes it)"""
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
