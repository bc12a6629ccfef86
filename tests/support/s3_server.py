"""A real S3-protocol server on localhost for the remote tests: moto in server mode (HTTP), driven with boto3.

`start()` returns an `S3Server` whose `env` holds the standard variables the client stacks read
(AWS_ENDPOINT_URL, keys, region): a streamconv subprocess given that environment talks to this server exactly as
it would to S3. `FaultProxy` sits between the client and the server and fails chosen requests (503 SlowDown,
connection reset) so the retry and failure paths run against real HTTP.
"""
from __future__ import annotations

import http.server
import logging
import os
import socket
import socketserver
import threading
import urllib.request
from pathlib import Path
from typing import Callable, Dict, Optional

import boto3
from moto.server import ThreadedMotoServer

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret-never-printed",
               "AWS_DEFAULT_REGION": "us-east-1",
               # a dead endpoint fails in seconds, not after botocore's default retries and timeouts
               "AWS_MAX_ATTEMPTS": "2", "AWS_RETRY_MODE": "standard"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    def __init__(self):
        logging.getLogger("werkzeug").setLevel(logging.ERROR)     # one line per request otherwise
        self.port = _free_port()
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env: Dict[str, str] = dict(CREDENTIALS, AWS_ENDPOINT_URL=self.url)

    def client(self, endpoint: Optional[str] = None):
        return boto3.client("s3", endpoint_url=endpoint or self.url, region_name="us-east-1",
                            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])

    def bucket(self, name: str) -> str:
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        return name

    def upload(self, folder, bucket: str, prefix: str) -> str:
        """Every file under local `folder` as objects under s3://bucket/prefix/; returns that URL."""
        self.bucket(bucket)
        client = self.client()
        folder = Path(folder)
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")
        return f"s3://{bucket}/{prefix}"

    def download(self, bucket: str, prefix: str, folder) -> Dict[str, bytes]:
        """{relative name: bytes} of every object under s3://bucket/prefix/."""
        client = self.client()
        out = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
            for item in page.get("Contents", []):
                out[item["Key"][len(prefix) + 1:]] = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
        return out

    def stop(self) -> None:
        self._server.stop()


def start() -> S3Server:
    return S3Server()


_ANSWERS = {
    "503": (503, b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code>"
                 b"<Message>Please reduce your request rate.</Message></Error>"),
    "501": (501, b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>NotImplemented</Code>"
                 b"<Message>A header you provided implies functionality that is not implemented</Message></Error>"),
}


class FaultProxy:
    """An HTTP proxy on localhost in front of `upstream`. `fault(method, path, headers) -> None | "503" | "501" |
    "reset" | "hang"` decides each request: None forwards it; "503" answers 503 SlowDown (S3's throttling); "501"
    answers NotImplemented (a service without a feature, e.g. conditional writes); "reset" closes the connection
    without an answer; "hang" keeps the connection open and never answers (until `stop`). `requests` counts what
    it saw."""

    def __init__(self, upstream: str, fault: Callable[..., Optional[str]]):
        self.upstream, self.fault = upstream, fault
        self.requests = 0
        self.faults = 0
        self._stopping = threading.Event()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                proxy.requests += 1
                body = self._body()
                what = proxy.fault(self.command, self.path, self.headers)
                if what is not None:
                    proxy.faults += 1
                if what == "hang":
                    proxy._stopping.wait(300)
                    self.close_connection = True
                    return
                if what == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    self.connection.close()
                    self.close_connection = True
                    return
                if what in _ANSWERS:
                    status, payload = _ANSWERS[what]
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                request = urllib.request.Request(proxy.upstream + self.path, data=body, method=self.command,
                                                 headers={k: v for k, v in self.headers.items()
                                                          if k.lower() not in ("host", "connection",
                                                                               "transfer-encoding", "expect")})
                if body is not None and not self.headers.get("Content-Type"):
                    # (else urllib sends a form's content type, and the server parses the upload as a form)
                    request.add_header("Content-Type", "binary/octet-stream")
                try:
                    with urllib.request.urlopen(request) as answer:
                        status, headers, payload = answer.status, answer.getheaders(), answer.read()
                except urllib.error.HTTPError as answer:
                    status, headers, payload = answer.code, answer.headers.items(), answer.read()
                self.send_response(status)
                for key, value in headers:
                    if key.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                        self.send_header(key, value)
                length = dict((k.lower(), v) for k, v in headers).get("content-length", "0")
                self.send_header("Content-Length", length if self.command == "HEAD" else str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            def _body(self):
                """The request's body: Content-Length bytes, or (uploads: botocore streams them) HTTP chunks."""
                if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                    parts = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass        # trailers
                            return b"".join(parts)
                        parts.append(self.rfile.read(size))
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else None

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True

        self._server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()


def env_for(server: S3Server, endpoint: Optional[str] = None) -> Dict[str, str]:
    """os.environ with the server's credentials and `endpoint` (default: the server itself)."""
    env = dict(os.environ, **server.env)
    if endpoint:
        env["AWS_ENDPOINT_URL"] = endpoint
    return env
