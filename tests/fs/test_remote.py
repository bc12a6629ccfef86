"""fs/remote.py and fs/location.py: what is a URL, --storage-options, the retry loop, and the one interface every
question about the checkpoint's folder goes through (local disk and fsspec's memory:// here; S3 in
tests/end_to_end/test_remote.py)."""
from __future__ import annotations

import os
import uuid

import fsspec
import pytest

from streamconv.errors import CheckpointError, OptionsError
from streamconv.fs import location, remote


@pytest.mark.parametrize("text, expected", [
    ("s3://bucket/run", True), ("gs://b/x", True), ("memory://x", True), ("file:///tmp/x", True),
    ("/tmp/s3://x", False), ("ckpt", False), ("./s3:/x", False), ("C:\\x", False), (None, False)])
def test_is_url(text, expected):
    assert remote.is_url(text) is expected


def test_storage_options_parse_and_never_echo_the_value():
    assert remote.parse_storage_options(None) == {}
    assert remote.parse_storage_options('{"anon": true}') == {"anon": True}
    with pytest.raises(OptionsError) as bad:
        remote.parse_storage_options('{"secret": "hunter2"')
    assert "hunter2" not in str(bad.value)
    with pytest.raises(OptionsError, match="JSON object"):
        remote.parse_storage_options('["secret"]')


def test_unknown_protocol_is_a_usage_error():
    with pytest.raises(OptionsError, match="nosuchproto"):
        remote.filesystem("nosuchproto://x/y")


class Flaky:
    def __init__(self, failures, exc):
        self.failures, self.exc, self.calls = failures, exc, 0

    def __call__(self):
        self.calls += 1
        if self.calls <= self.failures:
            raise self.exc
        return b"ok"


@pytest.mark.parametrize("exc", [ConnectionResetError(104, "Connection reset by peer"),
                                 OSError("An error occurred (SlowDown) when calling GetObject: 503"),
                                 TimeoutError("read timed out"),
                                 OSError(16, "Please reduce your request rate.")])     # s3fs's SlowDown
def test_transient_failures_are_retried_with_doubling_waits(exc):
    waits = []
    call = Flaky(3, exc)
    assert remote.with_retries("s3://b/x", call, CheckpointError, sleep=waits.append) == b"ok"
    assert call.calls == 4 and waits == [0.1, 0.2, 0.4]


def test_retries_are_bounded_then_the_error_names_what_failed():
    waits = []
    call = Flaky(100, ConnectionResetError(104, "Connection reset by peer"))
    with pytest.raises(CheckpointError) as failed:
        remote.with_retries("s3://b/x: read of bytes 0..10", call, CheckpointError, sleep=waits.append)
    assert call.calls == remote.RETRY_ATTEMPTS and len(waits) == remote.RETRY_ATTEMPTS - 1
    assert "s3://b/x: read of bytes 0..10" in str(failed.value) and "failed 5 times" in str(failed.value)


@pytest.mark.parametrize("exc", [PermissionError("Access Denied"), ValueError("bad range")])
def test_permanent_failures_are_not_retried(exc):
    call = Flaky(1, exc)
    with pytest.raises(CheckpointError):
        remote.with_retries("s3://b/x", call, CheckpointError, sleep=lambda s: pytest.fail("waited"))
    assert call.calls == 1


def test_gcsfs_errors_are_sorted_as_its_own_loop_sorted_them():
    """gs:// requests are tried once by gcsfs (fs/gcsfs_one_try.py), so what its loop retried is retried here:
    408, 429 (GCS's rate limit), 5xx, a failed token refresh; a 401 that is not one, a 400, a 403 fail at once."""
    pytest.importorskip("gcsfs")
    from gcsfs.retry import HttpError
    from google.auth.exceptions import RefreshError
    for code, message in ((408, "Request Timeout"), (429, "The rate of change requests exceeds the rate limit"),
                          (503, "Service Unavailable"), (401, "Invalid Credentials")):
        assert remote.is_transient(HttpError({"code": code, "message": message})), code
    assert remote.is_transient(RefreshError("the metadata server answered 500"))
    for code, message in ((401, "Login Required"), (400, "bad request"), (404, "No such object")):
        assert not remote.is_transient(HttpError({"code": code, "message": message})), code
    assert not remote.is_transient(OSError("Forbidden: b/o\nno access"))      # gcsfs's words for a 403


def test_missing_objects_pass_through_for_the_caller_to_word():
    with pytest.raises(FileNotFoundError):
        remote.with_retries("s3://b/x", Flaky(1, FileNotFoundError("x")), CheckpointError)


# -- location: one interface, two kinds of folder -----------------------------------------------------------


@pytest.fixture
def memory_folder():
    fs = fsspec.filesystem("memory")
    root = f"/streamconv-test-{uuid.uuid4().hex}"
    fs.pipe({f"{root}/.metadata": b"meta", f"{root}/__0_0.distcp": b"0123456789", f"{root}/sub/x": b"x"})
    yield f"memory://{root}"
    fs.rm(root, recursive=True)


@pytest.fixture
def local_folder(tmp_path):
    (tmp_path / ".metadata").write_bytes(b"meta")
    (tmp_path / "__0_0.distcp").write_bytes(b"0123456789")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x").write_bytes(b"x")
    return str(tmp_path)


@pytest.mark.parametrize("kind", ["local_folder", "memory_folder"])
def test_both_kinds_of_folder_answer_alike(kind, request):
    folder = request.getfixturevalue(kind)
    where = location.at(folder)
    assert where.is_dir() and where.exists()
    assert sorted(where.names()) == [".metadata", "__0_0.distcp", "sub"]
    entry = where.entry("__0_0.distcp")
    assert entry.kind == location.FILE and entry.size == 10 and entry.stamp[0] == 10
    assert where.entry("sub").kind == location.DIRECTORY and where.folders() == ["sub"]
    assert where.entry("absent") is None
    assert where.read("__0_0.distcp", 3, 4) == b"3456" and where.read_small(".metadata", 100) == b"meta"
    assert where.join("sub", "x") == folder.rstrip("/") + "/sub/x"
    assert sorted(location.metadata_names(folder)) == [".metadata"]
    assert not location.at(where.join("absent")).exists()


def test_a_rewritten_object_gets_another_version(memory_folder):
    fs = fsspec.filesystem("memory")
    where = location.at(memory_folder)
    before = location.entries(memory_folder, ["__0_0.distcp"])["__0_0.distcp"]
    fs.pipe(memory_folder[len("memory://"):] + "/__0_0.distcp", b"9876543210")    # same size
    after = location.entries(memory_folder, ["__0_0.distcp"])["__0_0.distcp"]
    assert before.size == after.size and before.version != after.version
    assert where.entry("__0_0.distcp").version == after.version


def test_glob_folders_in_memory_and_on_disk(tmp_path):
    fs = fsspec.filesystem("memory")
    root = f"/glob-{uuid.uuid4().hex}"
    fs.pipe({f"{root}/run/checkpoint-{n}/.metadata": b"m" for n in (1, 2)})
    fs.pipe(f"{root}/run/checkpoint-notes.txt", b"a file, not a folder")
    assert sorted(location.glob_folders(f"memory://{root}/run/checkpoint-*")) == \
        [f"memory://{root}/run/checkpoint-1", f"memory://{root}/run/checkpoint-2"]
    for n in (1, 2):
        os.makedirs(tmp_path / f"checkpoint-{n}")
    (tmp_path / "checkpoint-notes.txt").write_text("x")
    assert sorted(location.glob_folders(str(tmp_path / "checkpoint-*"))) == \
        [str(tmp_path / "checkpoint-1"), str(tmp_path / "checkpoint-2")]


def test_absolute_and_parent_keep_urls_as_they_are():
    assert location.absolute("s3://b/run/") == "s3://b/run/"
    assert location.absolute("rel") == os.path.abspath("rel")
    assert location.parent_and_name("s3://b/run/step-1") == ("s3://b/run", "step-1")
