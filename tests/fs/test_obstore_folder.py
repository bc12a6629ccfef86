"""fs/location.py's ObstoreFolder and fs/s3_obstore.py against a real S3-protocol server on localhost
(tests/support/local_s3.py): an s3:// checkpoint's listings, sizes, versions and side files go through obstore by
default, answering exactly what the fsspec folder (s3fs) answers, so a fingerprint is the same whichever client
took it; STREAMCONV_NO_FAST_PATHS=obstore (and obstore missing) keeps fsspec; a conversion through obstore
imports neither fsspec nor s3fs."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from streamconv.errors import CheckpointError, OutputError
from streamconv.fs import location, remote, s3_obstore
from tests.support.local_s3 import LocalS3

SECRET = "s3cr3t-never-printed"
FILES = {"ckpt/.metadata": b"m" * 300, "ckpt/__0_0.distcp": bytes(range(256)) * 40, "ckpt/empty": b"",
         "ckpt/sub/inner.json": b"{}", "ckpt/sub2/deeper/x": b"x", "other/y": b"y"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder-objects")
    for name, data in FILES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    running = LocalS3({"bkt": str(root)}).start()
    yield running
    running.stop()


@pytest.fixture
def env(server, monkeypatch):
    with server.as_the_environment(monkeypatch, SECRET):
        yield server


def test_s3_goes_through_obstore_unless_switched_off(env, monkeypatch):
    assert isinstance(location.at("s3://bkt/ckpt"), location.ObstoreFolder)
    assert isinstance(location.at("memory://x"), location.RemoteFolder)
    monkeypatch.setenv("STREAMCONV_NO_FAST_PATHS", "obstore")
    assert isinstance(location.at("s3://bkt/ckpt"), location.RemoteFolder)
    monkeypatch.setenv("STREAMCONV_NO_FAST_PATHS", "preadv")
    assert isinstance(location.at("s3://bkt/ckpt"), location.ObstoreFolder)
    monkeypatch.delenv("STREAMCONV_NO_FAST_PATHS")
    remote.StorageOptions.set({"requester_pays": True})     # s3fs's own meaning: fsspec answers
    assert isinstance(location.at("s3://bkt/ckpt"), location.RemoteFolder)


def test_without_obstore_installed_fsspec_answers(env, monkeypatch):
    monkeypatch.setitem(sys.modules, "obstore", None)
    monkeypatch.setattr(s3_obstore.importlib.util, "find_spec", lambda name: None)
    folder = location.at("s3://bkt/ckpt")
    assert isinstance(folder, location.RemoteFolder)
    assert folder.read_small(".metadata", 10) == b"m" * 10


def _answers(folder) -> dict:
    return {"exists": folder.exists(), "is_dir": folder.is_dir(), "names": folder.names(),
            "folders": folder.folders(),
            "entries": {n: folder.entry(n) for n in (".metadata", "__0_0.distcp", "empty", "sub", "missing")},
            "read": [folder.read_small(".metadata", 1000), folder.read("__0_0.distcp", 250, 10),
                     folder.read("__0_0.distcp", 10_235, 100), folder.read_small("empty", 100)],
            "join": folder.join("a", "b")}


def test_obstore_answers_what_s3fs_answers(env):
    """The same names, kinds, sizes, versions (ETag, last-modified: the fingerprint) and bytes."""
    fast = _answers(location.ObstoreFolder("s3://bkt/ckpt/", s3_obstore.store_for("s3://bkt/ckpt")))
    plain = _answers(location.RemoteFolder("s3://bkt/ckpt/"))
    assert fast["entries"] == plain["entries"]
    assert fast == dict(plain, read=fast["read"])
    assert fast["names"] == [".metadata", "__0_0.distcp", "empty", "sub", "sub2"]
    assert fast["folders"] == ["sub", "sub2"]
    assert fast["entries"]["__0_0.distcp"].kind == location.FILE
    assert fast["entries"]["__0_0.distcp"].stamp[0] == 10_240 and fast["entries"]["__0_0.distcp"].stamp[1]
    assert fast["entries"]["sub"].kind == location.DIRECTORY and fast["entries"]["missing"] is None
    assert fast["read"] == [b"m" * 300, bytes(range(250, 256)) + bytes(range(4)), bytes(range(251, 256)), b""]


def test_the_bucket_root_and_missing_folders(env):
    root = location.at("s3://bkt")
    assert root.is_dir() and root.names() == ["ckpt", "other"] and root.folders() == ["ckpt", "other"]
    missing = location.at("s3://bkt/nothing-here")
    assert not missing.exists() and not missing.is_dir()
    with pytest.raises(FileNotFoundError, match="s3://bkt/nothing-here: no such folder"):
        missing.names()
    assert location.metadata_names("s3://bkt/ckpt") == [".metadata"]
    assert location.entries("s3://bkt/ckpt", ["empty", "missing"])["missing"] is None


def test_a_rewritten_object_gets_another_version(env):
    folder = location.at("s3://bkt/other")
    before = folder.entry("y")
    with open(os.path.join(env.buckets["bkt"], "other", "y"), "wb") as rewritten:
        rewritten.write(b"z")
    after = folder.entry("y")
    assert before.size == after.size and before.version != after.version


def test_a_failing_service_is_the_callers_error_naming_the_url_never_the_secret(env, monkeypatch):
    monkeypatch.setattr(s3_obstore, "OBSTORE_RETRIES", 0)
    monkeypatch.setattr(remote, "RETRY_FIRST_WAIT_S", 0.001)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")     # nothing listens there
    with pytest.raises(CheckpointError) as failed:
        location.at("s3://bkt/ckpt").names()
    assert "s3://bkt/ckpt: listing: failed 5 times" in str(failed.value) and SECRET not in str(failed.value)
    with pytest.raises(OutputError, match=r"s3://bkt/ckpt/x: status"):
        location.at("s3://bkt/ckpt", OutputError).entry("x")


def test_open_file_reads_an_object_through_obstore(env):
    opened = location.open_file("s3://bkt/ckpt/__0_0.distcp")
    assert isinstance(opened._where, location.ObstoreFolder)
    assert opened.size == 10_240 and opened.pread(4, 10_238) == bytes([254, 255])
    with pytest.raises(FileNotFoundError):
        location.open_file("s3://bkt/ckpt/missing")


def test_listing_and_reading_through_obstore_imports_neither_fsspec_nor_s3fs(env):
    code = ("import sys\nfrom streamconv.fs import location\nf = location.at('s3://bkt/ckpt')\n"
            "assert f.names() and f.entry('.metadata').size == 300 and f.read_small('.metadata', 9)\n"
            "print(sorted(m for m in ('fsspec', 's3fs', 'botocore', 'obstore') if m in sys.modules))")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                          env=dict(os.environ, PYTHONPATH=root), timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["['obstore']"]
