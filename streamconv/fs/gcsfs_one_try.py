"""gcsfs with its own retry loop cut to one try per call, so that streamconv's bounded retry (`remote.with_retries`:
5 tries, 1.5 s of waits) is the one that decides how long a failing GCS endpoint is tried.

gcsfs retries every JSON-API request itself: `GCSFileSystem._request` is wrapped in `gcsfs.retry.retry_request`
with 6 tries, sleeping 1-2, 2-3, 4-5, 8-9 and 16-17 s in between (31-36 s), and the count is fixed when the class is
defined, not read from an option or the instance: no storage option and no variable changes it (gcsfs 2026.10).
Inside each of streamconv's 5 rounds that made a dead endpoint take about 3 minutes to give up. So `gs://` URLs
are opened with this subclass (`remote.filesystem`), whose `_request` is gcsfs's own request without the loop
(`__wrapped__`, the undecorated coroutine): the same errors, raised at once. (Not gcsfs's `retry_request` with one
try: it logs every failure with its traceback as "out of retries", which a CLI without logging configured prints
to stderr, once per retried request.) What the loop added besides retrying is lost: a 400 about a requester-pays
bucket is reported as the service words it, not as gcsfs's hint to set `requester_pays`.

gcsfs also sends every request with `timeout=requests_timeout`, None by default, which aiohttp reads as "no
timeout at all": a request to an endpoint that accepts the connection and never answers waited forever, and no
retry ever ran. This subclass sets `requests_timeout` to REQUEST_TIMEOUT_S unless the storage options give one
(`--storage-options '{"requests_timeout": 30}'`): the whole request, connecting to the last byte of the answer.

That reaches into gcsfs's private structure, so it is here alone: if a gcsfs release drops `__wrapped__`, the
subclass keeps gcsfs's loop (slower to give up, still correct), and tests/fs/test_gcsfs_one_try.py fails loudly.
Bulk deletions (`rm` of several objects) keep a loop of their own inside gcsfs for objects a batch answer
reports as failed with a 5xx (up to 5 rounds, 1-17 s apart); a failed batch request itself is one try here.
"""
from __future__ import annotations

import gcsfs


def _one_try(request):
    """gcsfs's request coroutine without its retry loop, or `request` itself when gcsfs no longer exposes the
    undecorated coroutine."""
    return getattr(request, "__wrapped__", request)


# One request, from connecting to its answer's last byte: a ranged GET of 4 MiB, a part of 8 MiB (up to ~50 MiB for
# a shard past 8 GiB), one server-side rewrite or compose call. 120 s leaves a slow link (under 1 MB/s) its time.
REQUEST_TIMEOUT_S = 120


class OneTryGCSFileSystem(gcsfs.GCSFileSystem):
    """gcsfs's filesystem, each request tried once and timed out (module docstring)."""

    _request = _one_try(gcsfs.GCSFileSystem._request)

    def __init__(self, *args, requests_timeout=None, **kwargs):
        super().__init__(*args, requests_timeout=REQUEST_TIMEOUT_S if requests_timeout is None else requests_timeout,
                         **kwargs)


# One instance cache with gcsfs's (fsspec keeps one per class; the key names the class, so they cannot collide):
# `gcsfs.GCSFileSystem.clear_instance_cache()`, which a gcsfs user calls after changing credentials or endpoint,
# drops these clients too.
OneTryGCSFileSystem._cache = gcsfs.GCSFileSystem._cache
