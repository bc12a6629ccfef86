"""Object storage through fsspec (`s3://`, `gs://`, `memory://`, any fsspec URL): which strings are URLs, the
filesystem a URL lives on, and the one retry loop every remote call goes through.

The `remote` extra brings fsspec, s3fs and gcsfs; without it a URL gets a one-line install hint (OptionsError, exit
64) and nothing else changes: this module imports fsspec only when a URL is used, so the core wheel and its start-up
stay numpy/click/tqdm.

Credentials and endpoints come the provider's standard way (for S3: `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`, profiles; fsspec's own `FSSPEC_<PROTOCOL>_<KWARG>` variables) plus
`storage_options`, the keyword arguments fsspec users pass to `fsspec.filesystem(protocol, **storage_options)`.
They are never put into a message: errors name the URL and the service's error only.
"""
from __future__ import annotations

import errno
import json
import re
import time
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, TypeVar

from ..errors import OptionsError, OutputError, StreamconvError

_URL = re.compile(r"([a-z][a-z0-9+.-]*)://", re.IGNORECASE)
INSTALL_HINT = "pip install 'streamconv[remote]'"

# Transient failures (a reset connection, a 5xx, throttling) are retried this many times in all, waiting
# RETRY_FIRST_WAIT_S, then twice as long each time (1.5 s in all by default): long enough for a restarted
# server or a throttling window, short enough that a dead endpoint fails within seconds.
RETRY_ATTEMPTS = 5
RETRY_FIRST_WAIT_S = 0.1

T = TypeVar("T")
_TRANSIENT_ERRNOS = {errno.EBUSY, errno.EAGAIN, errno.ECONNRESET, errno.ECONNABORTED, errno.ECONNREFUSED,
                     errno.ETIMEDOUT, errno.EPIPE}


def is_url(text: object) -> bool:
    """True for `scheme://...` (s3://bucket/x, memory://x, file:///x); a local path never has `://` at its start."""
    return isinstance(text, str) and _URL.match(text) is not None


def scheme(url: str) -> str:
    match = _URL.match(url)
    return match.group(1).lower() if match else ""


GCS_PROTOCOLS = ("gs", "gcs")
# What each client stack keeps resident once it has made its calls, for the predicted peak: measured as VmRSS after
# `import streamconv.cli, numpy`, then after its first calls (CPython 3.11, s3fs 2026.9, gcsfs 2026.10, 2-core VM,
# 2026-12-07; tests/memory/test_upload_memory.py measures them again): s3fs with aiobotocore, botocore (its service
# models) and aiohttp 46.4 MiB (import 30.5, first calls 15.9); obstore 8.3 MiB once it has listed a prefix; gcsfs
# with google-auth and aiohttp 59.8-60.4 MiB.
S3FS_RSS_BYTES = 47 << 20
OBSTORE_RSS_BYTES = 9 << 20
GCSFS_RSS_BYTES = 61 << 20


class StorageOptions:
    """`--storage-options JSON` (or the API's `storage_options=`): one process-wide dict, like fsspec's own
    `fsspec.config.conf`, so every place that opens a URL (discovery, the reader, the fingerprint) uses the same
    client. Set by the entry points before a run; empty means the provider's defaults."""

    _options: Dict[str, Any] = {}

    @classmethod
    def set(cls, options: Optional[Mapping[str, Any]]) -> None:
        cls._options = dict(options or {})

    @classmethod
    def get(cls) -> Dict[str, Any]:
        return dict(cls._options)


def parse_storage_options(text: Optional[str]) -> Dict[str, Any]:
    """The JSON object of `--storage-options` (OptionsError naming what is wrong, never echoing the value: it may
    hold a secret)."""
    if text is None or not text.strip():
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise OptionsError(f"--storage-options is not valid JSON ({exc.msg} at character {exc.pos}); pass an "
                           "object such as '{\"endpoint_url\": \"http://localhost:9000\"}'") from None
    if not isinstance(value, dict):
        raise OptionsError(f"--storage-options must be a JSON object of fsspec keyword arguments, got a "
                           f"{type(value).__name__}")
    return value


def filesystem(url: str) -> Tuple[Any, str]:
    """(the fsspec filesystem of `url`, the path on it without the scheme). OptionsError with the install hint
    when fsspec (or the protocol's package, e.g. s3fs for s3://) is not installed."""
    try:
        import fsspec
        from fsspec.core import split_protocol
    except ImportError:
        raise OptionsError(f"{url}: reading or writing a URL needs the remote extra: {INSTALL_HINT}") from None
    protocol, path = split_protocol(url)
    try:
        fs = _filesystem_class(fsspec, protocol)(**StorageOptions.get())
    except ImportError as exc:
        raise OptionsError(f"{url}: the {protocol}:// protocol needs a package that is not installed "
                           f"({_first_line(exc)}); {INSTALL_HINT}") from None
    except ValueError as exc:
        raise OptionsError(f"{url}: unknown protocol {protocol!r} ({_first_line(exc)})") from None
    except TypeError as exc:
        raise OptionsError(f"{url}: --storage-options do not suit {protocol}:// ({_first_line(exc)})") from None
    return fs, fs._strip_protocol(path).rstrip("/")


def _filesystem_class(fsspec, protocol: str):
    """fsspec's filesystem class for `protocol`, except on GCS: gcsfs with its own retry loop cut to one try per
    call, so that `with_retries` alone bounds how long a failing endpoint is tried (fs/gcsfs_one_try.py)."""
    if protocol in GCS_PROTOCOLS:
        from .gcsfs_one_try import OneTryGCSFileSystem     # ImportError without gcsfs: the install hint
        return OneTryGCSFileSystem
    return fsspec.get_filesystem_class(protocol)


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:limit]


def describe(exc: BaseException) -> str:
    """A service error as one line: its class and first line (botocore puts the HTTP status and error code there)."""
    return f"{type(exc).__name__}: {_first_line(exc)}"


def is_transient(exc: BaseException) -> bool:
    """A failure worth another try: a connection reset or timeout, a 5xx, throttling. A missing object, a denied
    request or a bad argument fails at once."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if type(exc).__module__.startswith("obstore"):
        return _obstore_transient(exc)
    if type(exc).__module__.startswith(("gcsfs", "google.auth")):
        return _gcsfs_transient(exc)
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:     # s3fs turns SlowDown into EBUSY
        return True
    text = f"{type(exc).__name__} {exc}"
    return bool(re.search(r"\b5\d\d\b|SlowDown|reduce your request rate|Throttl|RequestLimitExceeded|ServiceUnavailable|InternalError|"
                          r"ServerDisconnected|ClientOSError|ClientPayloadError|Connection (reset|aborted|refused)|"
                          r"ConnectionReset|EndpointConnectionError|ConnectTimeout|ReadTimeout|IncompleteRead|"
                          r"ResponseStreamingError|ConnectionClosed|Timeout", text))


# What gcsfs's own loop retried (gcsfs.retry.errs), now that each gs:// request is tried once (gcsfs_one_try.py):
# 408 Request Timeout, 429 Too Many Requests (GCS's rate limit), every 5xx.
_GCS_TRANSIENT_STATUSES = frozenset({408, 429}) | frozenset(range(500, 600))


def _gcsfs_transient(exc: BaseException) -> bool:
    """gcsfs's HttpError by its status, as gcsfs's own loop sorted them, including a 401 "Invalid Credentials",
    which gcsfs raises when refreshing a token failed (the token service, not the credentials); google-auth's
    RefreshError itself likewise. Other gcsfs errors (a 403's OSError, a 400's ValueError) fail at once."""
    if type(exc).__name__ == "RefreshError":
        return True
    code = getattr(exc, "code", None)
    if not isinstance(code, int):
        return False
    return code in _GCS_TRANSIENT_STATUSES or (code == 401 and "Invalid Credentials" in str(exc))


def _obstore_transient(exc: BaseException) -> bool:
    """obstore's errors by class: only a GenericError can be transient (the others are a missing object, a
    denied or unauthenticated request, a failed precondition, a bad path or option), and only when the service
    answered 5xx or the connection failed (its text: "status code: 503", "error sending request", a timeout)."""
    if type(exc).__name__ != "GenericError":
        return False
    return bool(re.search(r"status code: 5\d\d|error sending request|error decoding response body|"
                          r"connection (reset|closed|refused|aborted)|timed out|operation timed out|"
                          r"IncompleteMessage|SlowDown", str(exc), re.IGNORECASE))


def with_retries(what: str, call: Callable[[], T], error: Callable[[str], Exception],
                 attempts: Optional[int] = None, sleep: Callable[[float], None] = time.sleep) -> T:
    """`call()`, retried with doubling waits while it fails transiently (RETRY_ATTEMPTS in all); then
    `error(message)` naming `what` (the URL and range) and the last service error. FileNotFoundError passes
    through for the caller to word, and so does a StreamconvError a client raised itself."""
    attempts = RETRY_ATTEMPTS if attempts is None else attempts
    wait = RETRY_FIRST_WAIT_S
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except (FileNotFoundError, StreamconvError):     # ours are worded already (an object that changed)
            raise
        except Exception as exc:    # the client stacks raise many kinds; is_transient sorts them
            if not is_transient(exc):
                raise error(f"{what}: {describe(exc)}") from None
            if attempt == attempts:
                raise error(f"{what}: failed {attempts} times ({describe(exc)}); the storage service or the "
                            "network is failing; try again later") from None
            sleep(wait)
            wait *= 2
    raise AssertionError("unreachable")


def output_call(what: str, call: Callable[[], T]) -> T:
    """`with_retries` for a call on an output's objects: OutputError (exit 73), a missing bucket said so."""
    try:
        return with_retries(what, call, OutputError)
    except FileNotFoundError as exc:
        raise OutputError(f"{what}: {describe(exc)} (does the bucket exist?)") from None
