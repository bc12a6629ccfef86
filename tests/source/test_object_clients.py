"""source/object_clients.py and the RemoteReader over each client, against a real S3-protocol server on localhost
(tests/support/local_s3.py, checked against moto by tests/support/test_local_s3.py): obstore is the fast path
for s3://, fsspec the fallback, and both keep the reader's guarantees (exact bytes or an error, bounded retries,
a changed object detected, no secret in a message). tests/end_to_end/test_remote.py converts through both."""
from __future__ import annotations

import pickle
import sys

import pytest

from streamconv.errors import CheckpointError
from streamconv.fs import fastpaths, remote, s3_obstore
from streamconv.output.sink import MemorySink
from streamconv.source.object_clients import FSSPEC, OBSTORE, open_client
from streamconv.source.remote import RemoteReader, folder_reader, reading_paths
from tests.support.local_s3 import LocalS3
from tests.support.s3_server import FaultProxy

DATA = bytes(range(251)) * 50_000       # 12.5 MB: several requests of the reader's 8 MiB
SECRET = "s3cr3t-never-printed"
BOTH = [OBSTORE, FSSPEC]


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    root = tmp_path_factory.mktemp("objects")
    (root / "ckpt").mkdir()
    (root / "ckpt" / "__0_0.distcp").write_bytes(DATA)
    (root / "ckpt" / "small").write_bytes(b"abc")
    server = LocalS3({"bkt": str(root)}).start()
    yield server, root
    server.stop()


@pytest.fixture
def env(bucket, monkeypatch):
    """The standard AWS_* variables naming the local server (as a user names MinIO); no storage options."""
    server, _ = bucket
    with server.as_the_environment(monkeypatch, SECRET):
        yield server


def reader_for(kind: str, url: str = "s3://bkt/ckpt") -> RemoteReader:
    reader = folder_reader(url, fastpaths.FastPaths(obstore=kind == OBSTORE))
    assert reader.client.name == kind
    return reader


# -- the choice: made once, from FastPaths and what obstore can honour -----------------------------------------


def test_obstore_reads_s3_by_default_and_the_fallback_is_fsspec(env):
    fast = fastpaths.detect({})
    assert fast.obstore
    assert reading_paths(fast, "s3://bkt/ckpt").obstore
    assert open_client("s3://bkt/ckpt", fast).name == OBSTORE
    off = fastpaths.detect({"STREAMCONV_NO_FAST_PATHS": "1"})
    assert not off.obstore and open_client("s3://bkt/ckpt", off).name == FSSPEC
    only = fastpaths.detect({"STREAMCONV_NO_FAST_PATHS": "obstore"})
    assert not only.obstore and only.preadv == fast.preadv
    assert not reading_paths(fast, "/local/ckpt").obstore        # a file is never read through obstore
    assert open_client("memory://x", fast).name == FSSPEC       # obstore reads s3:// only here


def test_without_obstore_installed_fsspec_reads(env, monkeypatch):
    monkeypatch.setitem(sys.modules, "obstore", None)       # as if `pip install streamconv[remote]` lacked it
    monkeypatch.setattr(s3_obstore.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(fastpaths.importlib.util, "find_spec", lambda name: None)
    assert not fastpaths.detect({}).obstore
    assert open_client("s3://bkt/ckpt", fastpaths.FastPaths(obstore=True)).name == FSSPEC
    with reader_for(FSSPEC) as reader:
        assert reader.read("small", 0, 3) == b"abc"


@pytest.mark.parametrize("options, kind", [
    ({"key": "key", "secret": SECRET, "client_kwargs": {"region_name": "us-east-1"}}, OBSTORE),
    ({"anon": True}, OBSTORE),
    ({"config_kwargs": {"retries": {"max_attempts": 1}}}, FSSPEC),     # fsspec's own meaning: fsspec reads
    ({"requester_pays": True}, FSSPEC),
])
def test_storage_options_obstore_cannot_honour_keep_fsspec(env, options, kind):
    remote.StorageOptions.set(options)
    assert open_client("s3://bkt/ckpt", fastpaths.FastPaths(obstore=True)).name == kind


def test_storage_options_reach_obstore(env, monkeypatch):
    """The endpoint and keys from --storage-options alone (no AWS_* variables) reach the obstore client."""
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    remote.StorageOptions.set({"endpoint_url": env.url, "key": "key", "secret": SECRET})
    with reader_for(OBSTORE) as reader:
        assert reader.read("small", 0, 3) == b"abc"


def test_a_profile_with_its_own_endpoint_keeps_fsspec(env, monkeypatch, tmp_path):
    """botocore would send requests to the profile's endpoint_url; obstore would not see it: fsspec reads."""
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    config = tmp_path / "config"
    config.write_text("[profile elsewhere]\nendpoint_url = http://127.0.0.1:9\nregion = eu-west-1\n")
    (tmp_path / "credentials").write_text(f"[elsewhere]\naws_access_key_id = key\naws_secret_access_key = {SECRET}\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_PROFILE", "elsewhere")
    assert open_client("s3://bkt/ckpt", fastpaths.FastPaths(obstore=True)).name == FSSPEC
    # the same profile without an endpoint of its own: botocore's credentials, handed to obstore
    config.write_text("[profile elsewhere]\nregion = us-east-1\n")
    s3_obstore.clear_stores()
    with reader_for(OBSTORE) as reader:
        assert reader.read("small", 0, 3) == b"abc"


# -- the reader's guarantees, through each client ------------------------------------------------------------


@pytest.mark.parametrize("kind", BOTH)
def test_reads_are_exact_through_each_client(env, kind):
    with reader_for(kind) as reader:
        assert reader.size("__0_0.distcp") == len(DATA)
        for offset, length in [(0, 1), (5, 4096), ((1 << 20) - 3, 10), (123, 3 << 20), (0, len(DATA))]:
            assert reader.read("__0_0.distcp", offset, length) == DATA[offset:offset + length]
        a, b = bytearray(700_000), bytearray(9_500_000)
        reader.read_into("__0_0.distcp", 11, [memoryview(a), memoryview(b)])
        assert bytes(a + b) == DATA[11:11 + len(a) + len(b)]
        sink = MemorySink(len(DATA))
        reader.copy_to(sink, "__0_0.distcp", 7, 3, len(DATA) - 7)
        assert bytes(sink.data[3:3 + len(DATA) - 7]) == DATA[7:]


@pytest.mark.parametrize("kind", BOTH)
def test_a_missing_object_and_names_leaving_the_prefix(env, kind):
    with reader_for(kind) as reader:
        with pytest.raises(CheckpointError, match=r"s3://bkt/ckpt/__9_0\.distcp: file named in \.metadata is missing"):
            reader.size("__9_0.distcp")
        for name in ("../other/x", "/etc/passwd", "sub/../../x"):
            with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
                reader.read(name, 0, 1)


@pytest.mark.parametrize("kind", BOTH)
def test_a_short_answer_is_an_error_never_a_shorter_tensor(env, kind, monkeypatch):
    with reader_for(kind) as reader:
        reader.size("__0_0.distcp")
        get = reader.client.get
        monkeypatch.setattr(reader.client, "get", lambda path, start, end: bytes(get(path, start, end))[:-1])
        with pytest.raises(CheckpointError, match="changed during the run"):
            reader.read("__0_0.distcp", 0, 2 << 20)


def test_obstore_detects_an_object_rewritten_during_the_run_at_the_next_read(env, bucket, tmp_path):
    """Same size, other bytes (a re-upload): the next GET carries If-Match and fails; nothing is read."""
    _, root = bucket
    path = root / "ckpt" / "rewritten"
    path.write_bytes(b"a" * (3 << 20))
    with reader_for(OBSTORE) as reader:
        assert reader.read("rewritten", 0, 10) == b"a" * 10
        replacement = tmp_path / "new"
        replacement.write_bytes(b"b" * (3 << 20))
        replacement.replace(path)       # a new inode, as an upload makes a new object
        with pytest.raises(CheckpointError, match="changed while it was converted") as changed:
            reader.read("rewritten", 2 << 20, 10)       # another block: a GET
        assert "s3://bkt/ckpt/rewritten" in str(changed.value)


@pytest.mark.parametrize("kind", BOTH)
@pytest.mark.parametrize("fault", ["503", "reset"])
def test_transient_failures_are_retried_then_the_bytes_are_exact(env, kind, fault, monkeypatch):
    state = {"n": 0}

    def every_other(method, path, headers):
        state["n"] += 1
        return fault if state["n"] % 2 else None

    proxy = FaultProxy(env.url, every_other)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    # the clients' own retries off (obstore's; botocore's): our rounds (fs.remote.with_retries) must do it
    monkeypatch.setattr(s3_obstore, "OBSTORE_RETRIES", 0)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setattr(remote, "RETRY_FIRST_WAIT_S", 0.01)
    try:
        with reader_for(kind) as reader:
            assert reader.read("__0_0.distcp", 100, 3 << 20) == DATA[100:100 + (3 << 20)]
    finally:
        proxy.stop()
    assert proxy.faults >= 2


@pytest.mark.parametrize("kind", BOTH)
def test_a_service_that_keeps_failing_is_a_bounded_error_naming_the_url_never_the_secret(env, kind, monkeypatch):
    monkeypatch.setattr(remote, "RETRY_FIRST_WAIT_S", 0.01)
    monkeypatch.setattr(s3_obstore, "OBSTORE_RETRIES", 1)
    proxy = FaultProxy(env.url, lambda method, path, headers: "503" if method == "GET" and "distcp" in path
                       else None)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    try:
        with reader_for(kind) as reader:
            with pytest.raises(CheckpointError) as failed:
                reader.read("__0_0.distcp", 0, 10)
    finally:
        proxy.stop()
    message = str(failed.value)
    assert "s3://bkt/ckpt/__0_0.distcp: read of bytes 0..1,048,576" in message      # (the block holding it)
    assert f"failed {remote.RETRY_ATTEMPTS} times" in message
    assert "503" in message or "reduce your request rate" in message      # the service's answer
    assert SECRET not in message
    assert proxy.faults <= remote.RETRY_ATTEMPTS * 10      # bounded: our rounds x the client's own tries


@pytest.mark.parametrize("kind", BOTH)
def test_a_reader_pickles_to_its_url_and_its_kind_of_client(env, kind):
    reader = reader_for(kind)
    copy = pickle.loads(pickle.dumps(reader))
    assert copy.root == "s3://bkt/ckpt" and copy.client.name == kind
    assert copy.read("small", 0, 3) == b"abc"
