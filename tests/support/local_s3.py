"""A read-only S3-protocol server over local folders, whose ranged GETs cost O(range): for the remote benchmark
and for tests that read big objects.

moto (tests/support/s3_server.py) stays the protocol reference of the correctness tests, but it answers a ranged
GET by reading the whole object first (its `_handle_range_header` slices the full body): 8 MiB of a 520 MB
`.distcp` costs 520 MB of copying, so a 2 GB checkpoint took longer to locate than to convert. This server answers
from the file itself with `sendfile` (the bytes asked for, nothing else), so what a benchmark measures is the
client.

It implements the subset the three client stacks use to read (boto3, s3fs/aiobotocore, obstore), checked against
moto by tests/support/test_local_s3.py with the same calls:

* `GET /bucket/key` with `Range: bytes=a-b | a- | -n` (206 + Content-Range; 416 InvalidRange), `If-Match` (412),
  `If-None-Match` (304); `HEAD /bucket/key` (ETag, Content-Length, Last-Modified); 404 NoSuchKey / NoSuchBucket.
* `GET /bucket?list-type=2` with `prefix`, `delimiter`, `max-keys`, `continuation-token`, `start-after`
  (ListObjectsV2; CommonPrefixes for the delimiter); `GET /bucket?location`; `HEAD /bucket`.

Objects are the files under each bucket's folder (symlinks followed: a benchmark links its cached checkpoint in
instead of uploading it). Writes are refused (501): tests put files into the folder. Requests are not
authenticated (any signature is accepted). The ETag is a digest of (size, mtime, inode), so rewriting a file
changes it, as a re-upload changes an S3 ETag.

    python -m tests.support.local_s3 --bucket bench=/path/to/folder [--port 0]    # prints "ready <url>"
"""
from __future__ import annotations

import argparse
import contextlib
import email.utils
import hashlib
import http.server
import os
import posixpath
import re
import socketserver
import sys
import threading
import time
import urllib.parse
from typing import Dict, List, Optional, Tuple
from xml.sax.saxutils import escape

_NS = "http://s3.amazonaws.com/doc/2006-03-01/"
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
DEFAULT_MAX_KEYS = 1000


class _Missing(Exception):
    pass


def etag_of(st: os.stat_result) -> str:
    return '"' + hashlib.md5(f"{st.st_size}-{st.st_mtime_ns}-{st.st_ino}".encode()).hexdigest() + '"'


def _iso(mtime: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(mtime))


class LocalS3:
    """The buckets ({name: folder}) and the server answering for them on 127.0.0.1."""

    def __init__(self, buckets: Dict[str, str], port: int = 0):
        self.buckets = {name: os.path.abspath(folder) for name, folder in buckets.items()}
        self.requests = 0       # every request answered (tests count them)
        self.bytes_sent = 0     # object bytes sent (tests check a ranged GET sends only its range)
        self.connections = 0    # connections accepted (a client that reuses its connections opens few)
        self._lock = threading.Lock()
        owner = self

        class Handler(_Handler):
            server_of = owner

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True
            request_queue_size = 128

        self._server = Server(("127.0.0.1", port), Handler)
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "LocalS3":
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._server.serve_forever()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    @contextlib.contextmanager
    def as_the_environment(self, monkeypatch, secret: str):
        """While in the block: this server named in the standard AWS_* variables (as a user names MinIO), no
        storage options, no client made for another endpoint (fsspec's and s3_obstore's keep one per options)."""
        from s3fs import S3FileSystem
        from streamconv.fs import remote, s3_obstore
        for name in ("AWS_PROFILE", "AWS_REGION", "AWS_ENDPOINT_URL_S3", "STREAMCONV_NO_FAST_PATHS"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("AWS_ENDPOINT_URL", self.url)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        remote.StorageOptions.set({})
        S3FileSystem.clear_instance_cache()
        s3_obstore.clear_stores()
        try:
            yield self
        finally:
            S3FileSystem.clear_instance_cache()
            s3_obstore.clear_stores()
            remote.StorageOptions.set({})

    def count(self, sent: int = 0) -> None:
        with self._lock:
            self.requests += 1
            self.bytes_sent += sent

    # -- the buckets' objects ----------------------------------------------------------------------------

    def file_of(self, bucket: str, key: str) -> str:
        """The file of s3://bucket/key (_Missing when there is none; a key never leaves its bucket's folder)."""
        root = self.buckets.get(bucket)
        if root is None:
            raise _Missing("NoSuchBucket")
        parts = key.split("/")
        if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\x00" in key:
            raise _Missing("NoSuchKey")
        path = os.path.join(root, *parts)
        if not os.path.isfile(path):
            raise _Missing("NoSuchKey")
        return path

    def keys(self, bucket: str, prefix: str) -> List[Tuple[str, os.stat_result]]:
        """(key, stat) of every object whose key starts with `prefix`, sorted by key."""
        root = self.buckets[bucket]
        # Walk only the folder the prefix points into: a prefix "a/b/c" can only match under a/b/.
        start = posixpath.dirname(prefix)
        top = os.path.join(root, *start.split("/")) if start else root
        found = []
        for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
            dirnames.sort()
            rel = os.path.relpath(dirpath, root).replace(os.sep, "/")
            for name in filenames:
                key = name if rel == "." else f"{rel}/{name}"
                if key.startswith(prefix):
                    try:
                        found.append((key, os.stat(os.path.join(dirpath, name))))
                    except OSError:
                        pass
        return sorted(found)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_of: LocalS3

    def log_message(self, *args):
        pass

    def setup(self):
        super().setup()
        with self.server_of._lock:
            self.server_of.connections += 1

    # -- answers -------------------------------------------------------------------------------------------

    def _send(self, status: int, body: bytes = b"", headers: Optional[Dict[str, str]] = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)
        self.server_of.count()

    def _error(self, status: int, code: str, message: str) -> None:
        body = (f"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{escape(message)}"
                f"</Message><Resource>{escape(self.path)}</Resource></Error>").encode()
        self._send(status, body if self.command != "HEAD" else b"", {"Content-Type": "application/xml"})

    def _split(self) -> Tuple[str, str, Dict[str, str]]:
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        bucket, _, key = urllib.parse.unquote(url.path).lstrip("/").partition("/")
        return bucket, key, query

    def do_GET(self):
        bucket, key, query = self._split()
        if bucket not in self.server_of.buckets:
            return self._error(404, "NoSuchBucket", "The specified bucket does not exist")
        if key:
            return self._object(bucket, key)
        if "location" in query:
            return self._send(200, f'<?xml version="1.0" encoding="UTF-8"?>\n<LocationConstraint xmlns="{_NS}"/>'
                              .encode(), {"Content-Type": "application/xml"})
        return self._list(bucket, query)

    def do_HEAD(self):
        bucket, key, _ = self._split()
        if bucket not in self.server_of.buckets:
            return self._error(404, "NoSuchBucket", "The specified bucket does not exist")
        if not key:
            return self._send(200, b"", {"x-amz-bucket-region": "us-east-1"})
        return self._object(bucket, key)

    def _refuse(self):
        self._error(501, "NotImplemented", "this local S3 server is read-only (tests/support/local_s3.py)")

    do_PUT = do_POST = do_DELETE = _refuse

    def _object(self, bucket: str, key: str) -> None:
        try:
            path = self.server_of.file_of(bucket, key)
        except _Missing as missing:
            return self._error(404, str(missing), "The specified key does not exist.")
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            etag = etag_of(st)
            wanted = self.headers.get("If-Match")
            if wanted is not None and wanted.strip() not in ("*", etag) and \
                    etag not in [w.strip() for w in wanted.split(",")]:
                return self._error(412, "PreconditionFailed", "At least one of the pre-conditions you specified "
                                   "did not hold")
            if self.headers.get("If-None-Match") in (etag, "*"):
                return self._send(304, b"", {"ETag": etag})
            size = st.st_size
            start, end, status = 0, size, 200
            header = self.headers.get("Range")
            if header is not None:
                span = self._range(header, size)
                if span is None:
                    return self._error(416, "InvalidRange", "The requested range is not satisfiable")
                start, end = span
                status = 206
            headers = {"ETag": etag, "Last-Modified": email.utils.formatdate(st.st_mtime, usegmt=True),
                       "Content-Length": str(end - start), "Accept-Ranges": "bytes",
                       "Content-Type": "binary/octet-stream"}
            if status == 206:
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            if self.command == "HEAD":
                return self.server_of.count()
            self.wfile.flush()
            sent = 0
            while sent < end - start:       # the kernel copies the range from the page cache to the socket
                n = os.sendfile(self.connection.fileno(), f.fileno(), start + sent, end - start - sent)
                if n == 0:
                    break
                sent += n
            self.server_of.count(sent)

    @staticmethod
    def _range(header: str, size: int) -> Optional[Tuple[int, int]]:
        """[start, end) of `bytes=a-b`, `bytes=a-`, `bytes=-n` within `size`; None when not satisfiable."""
        match = _RANGE.match(header.strip())
        if not match or match.groups() == ("", ""):
            return None
        first, last = match.groups()
        if first == "":
            start, end = max(0, size - int(last)), size
        else:
            start = int(first)
            end = size if last == "" else min(size, int(last) + 1)
        if start >= size or end <= start:
            return None
        return start, end

    def _list(self, bucket: str, query: Dict[str, str]) -> None:
        if query.get("list-type") != "2":
            return self._error(501, "NotImplemented", "only ListObjectsV2 (list-type=2) is served here")
        prefix, delimiter = query.get("prefix", ""), query.get("delimiter", "")
        max_keys = int(query.get("max-keys") or DEFAULT_MAX_KEYS)
        after = query.get("continuation-token") or query.get("start-after") or ""
        rows: List[Tuple[str, Optional[os.stat_result]]] = []
        prefixes = set()
        for key, st in self.server_of.keys(bucket, prefix):
            rest = key[len(prefix):]
            if delimiter and delimiter in rest:
                common = prefix + rest[:rest.index(delimiter) + len(delimiter)]
                if common not in prefixes:
                    prefixes.add(common)
                    rows.append((common, None))
            else:
                rows.append((key, st))
        rows = [r for r in sorted(rows, key=lambda r: r[0]) if r[0] > after]
        page, truncated = rows[:max_keys], len(rows) > max_keys
        parts = [f'<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult xmlns="{_NS}">',
                 f"<Name>{escape(bucket)}</Name><Prefix>{escape(prefix)}</Prefix>",
                 f"<KeyCount>{len(page)}</KeyCount><MaxKeys>{max_keys}</MaxKeys>",
                 f"<Delimiter>{escape(delimiter)}</Delimiter>" if delimiter else "",
                 f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>"]
        if truncated:
            parts.append(f"<NextContinuationToken>{escape(page[-1][0])}</NextContinuationToken>")
        for key, st in page:
            if st is None:
                parts.append(f"<CommonPrefixes><Prefix>{escape(key)}</Prefix></CommonPrefixes>")
            else:
                parts.append(f"<Contents><Key>{escape(key)}</Key><LastModified>{_iso(st.st_mtime)}</LastModified>"
                             f"<ETag>{escape(etag_of(st))}</ETag><Size>{st.st_size}</Size>"
                             "<StorageClass>STANDARD</StorageClass></Contents>")
        parts.append("</ListBucketResult>")
        self._send(200, "".join(parts).encode(), {"Content-Type": "application/xml"})


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="A read-only S3-protocol server over local folders.")
    p.add_argument("--bucket", action="append", required=True, metavar="NAME=FOLDER")
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args(argv)
    buckets = dict(b.split("=", 1) for b in args.bucket)
    server = LocalS3(buckets, args.port)
    print(f"ready {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main(sys.argv[1:])
