"""fs/gcsfs_one_try.py: gs:// is opened with gcsfs's filesystem whose own retry loop is cut to one try, so that
streamconv's bounded retry (fs/remote.py, RETRY_ATTEMPTS) is what decides, against the local GCS server behind a
proxy that answers 503. If gcsfs changes how it wraps `_request`, the first test fails: look at gcsfs/retry.py and
follow it in `_one_try`."""
from __future__ import annotations

import pytest

from streamconv.errors import CheckpointError
from streamconv.fs import remote
from tests.support.s3_server import FaultProxy     # an HTTP proxy: S3's or GCS's requests alike

gcsfs = pytest.importorskip("gcsfs")


def test_gs_urls_get_gcsfs_with_its_retry_loop_cut_to_one_try(gcs_env):
    from streamconv.fs.gcsfs_one_try import OneTryGCSFileSystem
    assert hasattr(gcsfs.GCSFileSystem._request, "__wrapped__"), "gcsfs no longer exposes its undecorated request"
    assert OneTryGCSFileSystem._request is not gcsfs.GCSFileSystem._request
    fs, path = remote.filesystem("gs://some-bucket/x")
    assert type(fs) is OneTryGCSFileSystem and path == "some-bucket/x"
    gcsfs.GCSFileSystem.clear_instance_cache()                  # one cache with gcsfs's: ours is dropped too
    assert remote.filesystem("gs://some-bucket/x")[0] is not fs


def test_a_failing_endpoint_is_tried_once_per_round_of_ours(gcs_env, monkeypatch):
    """Every request answered 503: gcsfs's own loop would send 6 per call (31-36 s asleep); here each call sends
    one, and `with_retries` sends RETRY_ATTEMPTS of them, then fails naming the URL."""
    gcs_env.bucket("onetry")
    gcs_env.put("onetry", "obj", b"0123456789")
    proxy = FaultProxy(gcs_env.url, lambda method, path, headers: None)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
    gcsfs.GCSFileSystem.clear_instance_cache()
    try:
        fs, path = remote.filesystem("gs://onetry/obj")
        assert fs.cat_file(path, start=0, end=4) == b"0123"  # through the proxy
        proxy.fault = lambda method, path, headers: "503"
        before = proxy.requests
        with pytest.raises(CheckpointError, match=r"gs://onetry/obj: failed 5 times"):
            remote.with_retries("gs://onetry/obj", lambda: fs.cat_file(path, start=0, end=4), CheckpointError,
                                sleep=lambda seconds: None)
        assert proxy.requests - before == remote.RETRY_ATTEMPTS
    finally:
        proxy.stop()
        gcsfs.GCSFileSystem.clear_instance_cache()


def test_requests_time_out_unless_the_storage_options_say_otherwise(gcs_env):
    """gcsfs's default (requests_timeout None) is aiohttp's "no timeout": a silent endpoint hung the run forever."""
    from streamconv.fs.gcsfs_one_try import REQUEST_TIMEOUT_S
    assert remote.filesystem("gs://some-bucket/x")[0].requests_timeout == REQUEST_TIMEOUT_S
    remote.StorageOptions.set({"token": "anon", "requests_timeout": 7})
    assert remote.filesystem("gs://some-bucket/x")[0].requests_timeout == 7


def test_an_endpoint_that_never_answers_fails_after_our_rounds(gcs_env, monkeypatch):
    """Every request held open without an answer: each try times out (here after 0.3 s, from the storage
    options), and `with_retries` gives up after RETRY_ATTEMPTS of them, naming the URL."""
    proxy = FaultProxy(gcs_env.url, lambda method, path, headers: "hang")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
    remote.StorageOptions.set({"token": "anon", "requests_timeout": 0.3})
    gcsfs.GCSFileSystem.clear_instance_cache()
    try:
        fs, path = remote.filesystem("gs://hung/obj")
        with pytest.raises(CheckpointError, match=r"gs://hung/obj: failed 5 times \(FSTimeoutError"):
            remote.with_retries("gs://hung/obj", lambda: fs.cat_file(path, start=0, end=4), CheckpointError,
                                sleep=lambda seconds: None)
        assert proxy.requests == remote.RETRY_ATTEMPTS
    finally:
        proxy.stop()
        gcsfs.GCSFileSystem.clear_instance_cache()
