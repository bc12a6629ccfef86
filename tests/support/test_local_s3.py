"""tests/support/local_s3.py answers the client calls streamconv and the benchmark make exactly as moto (the
protocol reference) does: boto3, s3fs and obstore each ask both servers the same questions about the same objects,
and the answers are compared. Then what moto cannot do: a ranged GET of a huge object sends only its range."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.support import s3_server as moto_s3
from tests.support.local_s3 import LocalS3

BUCKET = "same"
KEY = moto_s3.CREDENTIALS["AWS_ACCESS_KEY_ID"]
SECRET = moto_s3.CREDENTIALS["AWS_SECRET_ACCESS_KEY"]
FILES = {"ckpt/.metadata": b"meta" * 100, "ckpt/__0_0.distcp": bytes(range(256)) * 3000,
         "ckpt/__1_0.distcp": b"x" * 70_001, "ckpt/sub/deep/file.txt": b"deep", "other/a b+c.txt": b"spaces"}


@pytest.fixture(scope="module")
def servers(s3_server, tmp_path_factory):
    """{"moto": endpoint, "local": endpoint}, both holding FILES in bucket BUCKET."""
    root = tmp_path_factory.mktemp("local-s3") / BUCKET
    for name, data in FILES.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    s3_server.bucket(BUCKET)
    client = s3_server.client()
    for name, data in FILES.items():
        client.put_object(Bucket=BUCKET, Key=name, Body=data)
    local = LocalS3({BUCKET: str(root)}).start()
    yield {"moto": s3_server.url, "local": local.url, "root": root, "server": local}
    local.stop()


def boto3_answers(endpoint: str) -> dict:
    import boto3
    from botocore.exceptions import ClientError
    c = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=KEY,
                     aws_secret_access_key=SECRET)
    out = {}
    head = c.head_object(Bucket=BUCKET, Key="ckpt/__0_0.distcp")
    out["head"] = (head["ContentLength"], bool(head["ETag"]), "LastModified" in head)
    for rng in ("bytes=5-20", "bytes=-7", "bytes=767990-", "bytes=0-99999999"):
        got = c.get_object(Bucket=BUCKET, Key="ckpt/__0_0.distcp", Range=rng)
        out[rng] = (got["Body"].read(), got["ContentRange"], got["ResponseMetadata"]["HTTPStatusCode"])
    listed = c.list_objects_v2(Bucket=BUCKET, Prefix="ckpt/", Delimiter="/")
    out["list/"] = ([(o["Key"], o["Size"]) for o in listed["Contents"]],
                    [p["Prefix"] for p in listed.get("CommonPrefixes", [])], listed["KeyCount"])
    pages = c.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="", PaginationConfig={"PageSize": 2})
    out["pages"] = [[o["Key"] for o in page.get("Contents", [])] for page in pages]
    out["list none"] = c.list_objects_v2(Bucket=BUCKET, Prefix="nothing/").get("KeyCount")
    c.head_bucket(Bucket=BUCKET)
    for call, kwargs in [("get_object", dict(Key="ckpt/missing")), ("head_object", dict(Key="ckpt/missing")),
                         ("get_object", dict(Key="ckpt/.metadata", Range="bytes=999999-")),
                         ("get_object", dict(Key="ckpt/.metadata", IfMatch='"not-the-etag"')),
                         ("get_object", dict(Bucket="no-such-bucket", Key="x"))]:
        try:
            getattr(c, call)(**dict(dict(Bucket=BUCKET), **kwargs))
            out[call, str(kwargs)] = "answered"
        except ClientError as exc:
            out[call, str(kwargs)] = (exc.response["Error"]["Code"],
                                      exc.response["ResponseMetadata"]["HTTPStatusCode"])
    etag = c.head_object(Bucket=BUCKET, Key="ckpt/.metadata")["ETag"]
    out["if-match"] = c.get_object(Bucket=BUCKET, Key="ckpt/.metadata", IfMatch=etag)["Body"].read()
    return out


def s3fs_answers(endpoint: str) -> dict:
    import fsspec
    fs = fsspec.filesystem("s3", endpoint_url=endpoint, key=KEY, secret=SECRET, skip_instance_cache=True,
                           use_listings_cache=False)
    info = fs.info(f"{BUCKET}/ckpt/__1_0.distcp")
    return {"info": (info["size"], info["type"], bool(info.get("ETag"))),
            "dir": (fs.info(f"{BUCKET}/ckpt")["type"], fs.isdir(f"{BUCKET}/ckpt/sub"), fs.isdir(f"{BUCKET}/nope")),
            "ls": fs.ls(f"{BUCKET}/ckpt", detail=False),
            "ls detail": sorted((i["name"], i["type"]) for i in fs.ls(f"{BUCKET}/ckpt", detail=True)),
            "glob": sorted(fs.glob(f"{BUCKET}/ckpt/__*")),
            "find": fs.find(f"{BUCKET}/"),
            "cat": fs.cat_file(f"{BUCKET}/ckpt/__0_0.distcp", start=100, end=70_000),
            "cat spaces": fs.cat_file(f"{BUCKET}/other/a b+c.txt"),
            "exists": (fs.exists(f"{BUCKET}/ckpt/.metadata"), fs.exists(f"{BUCKET}/ckpt/missing"))}


def obstore_answers(endpoint: str) -> dict:
    import obstore
    from obstore.store import S3Store
    store = S3Store(BUCKET, endpoint=endpoint, access_key_id=KEY, secret_access_key=SECRET, region="us-east-1",
                    client_options={"allow_http": True})
    head = obstore.head(store, "ckpt/__0_0.distcp")
    out = {"head": (head["size"], bool(head["e_tag"])),
           "range": bytes(obstore.get_range(store, "ckpt/__0_0.distcp", start=3, end=70_003)),
           "if-match": bytes(obstore.get(store, "ckpt/__0_0.distcp",
                                         options={"range": (1, 9), "if_match": head["e_tag"]}).bytes()),
           "list": sorted((m["path"], m["size"]) for batch in obstore.list(store, prefix="ckpt") for m in batch),
           "delimited": sorted(obstore.list_with_delimiter(store, prefix="ckpt")["common_prefixes"])}
    for what, call in [("missing", lambda: obstore.head(store, "ckpt/missing")),
                       ("changed", lambda: obstore.get(store, "ckpt/.metadata", options={"if_match": '"x"'}))]:
        try:
            call()
            out[what] = "answered"
        except Exception as exc:    # obstore's own classes: the same for both servers is the point
            out[what] = type(exc).__name__
    return out


@pytest.mark.parametrize("answers", [boto3_answers, s3fs_answers, obstore_answers])
def test_the_local_server_answers_as_moto_does(servers, answers):
    assert answers(servers["local"]) == answers(servers["moto"])


def test_a_ranged_get_of_a_huge_object_sends_only_its_range(servers):
    """A 4 GiB (sparse) object: 10 bytes at its end cost 10 bytes sent, and no time (moto would read 4 GiB)."""
    import boto3
    huge = Path(servers["root"]) / "huge.bin"
    with open(huge, "wb") as f:
        f.truncate(4 << 30)
        f.seek((4 << 30) - 10)
        f.write(b"0123456789")
    try:
        server = servers["server"]
        c = boto3.client("s3", endpoint_url=servers["local"], region_name="us-east-1", aws_access_key_id=KEY,
                         aws_secret_access_key=SECRET)
        before = server.bytes_sent
        t0 = time.perf_counter()
        body = c.get_object(Bucket=BUCKET, Key="huge.bin", Range=f"bytes={(4 << 30) - 10}-")["Body"].read()
        assert body == b"0123456789"
        assert time.perf_counter() - t0 < 5
        # The server thread counts what it sent after sendfile returns, which may be after the client has the
        # bytes: wait for the count (a server that sent the whole object would count 4 GiB, not 10).
        deadline = time.monotonic() + 5
        while server.bytes_sent == before and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.bytes_sent - before == 10
    finally:
        os.remove(huge)


def test_keys_never_leave_the_bucket_folder(servers):
    import urllib.error
    import urllib.request
    (Path(servers["root"]).parent / "secret.txt").write_bytes(b"outside")
    for path in (f"/{BUCKET}/../secret.txt", f"/{BUCKET}/ckpt/../../secret.txt", f"/{BUCKET}/%2E%2E/secret.txt"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(servers["local"] + path)
        assert refused.value.code == 404, path


def test_writes_are_refused(servers):
    import boto3
    from botocore.exceptions import ClientError
    c = boto3.client("s3", endpoint_url=servers["local"], region_name="us-east-1", aws_access_key_id=KEY,
                     aws_secret_access_key=SECRET)
    with pytest.raises(ClientError, match="NotImplemented"):
        c.put_object(Bucket=BUCKET, Key="new", Body=b"x")
    assert not (Path(servers["root"]) / "new").exists()
