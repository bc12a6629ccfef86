"""Converting INTO object storage (issue 21 items 2 and 6), against a real S3-protocol server: moto over HTTP on
localhost (`s3_server`, tests/support/s3_server.py) and the real client stack (fsspec + s3fs). streamconv runs as a
user runs it (`python -m streamconv` with the standard AWS_* variables); the prefix it writes is downloaded with
boto3 and compared byte for byte with a local conversion of the same checkpoint.

The commit protocol under test (output/remote_staging.py, docs/remote.md): shards are multipart uploads into a
staging prefix, the record (streamconv.json) is published last and is what "finished" means.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import s3_server as s3

BUCKET = "hfout"


def run(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "streamconv", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)


def files_of(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def same_output(remote: dict, local: dict) -> None:
    """Every object equal to the local file byte for byte; the record equal but for a stat fingerprint."""
    assert sorted(remote) == sorted(local)
    for name in remote:
        if name == "streamconv.json":
            a, b = json.loads(remote[name]), json.loads(local[name])
            for record in (a, b):
                if record["source"]["fingerprint"].startswith("stat1-"):
                    record["source"].pop("fingerprint")
            assert a == b
        else:
            assert remote[name] == local[name], name


def uploads_in_progress(server, prefix: str) -> list:
    answer = server.client().list_multipart_uploads(Bucket=BUCKET, Prefix=prefix + "/")
    return answer.get("Uploads", [])


@pytest.fixture(scope="module")
def bucket(s3_server):
    return s3_server.bucket(BUCKET)


@pytest.fixture(scope="module")
def fsdp2_url(s3_server, dcp_checkpoints):
    return dcp_checkpoints["fsdp2"], s3_server.upload(dcp_checkpoints["fsdp2"], "ckpts-out", "fsdp2")


def test_demo_converted_into_s3_is_the_local_conversion_byte_for_byte(s3_server, bucket, demo_checkpoint, tmp_path):
    """The demo (4 ranks, config and tokenizer beside it) into s3://, sharded, config copied; the downloaded
    prefix equals the local output file for file; verify passes on the bucket output; nothing is left behind."""
    ckpt = Path(demo_checkpoint.ckpt_dir)
    env = s3.env_for(s3_server)
    args = ["--config-from", ckpt / "hf_config", "--max-shard-size", "200KB"]
    local = run("convert", ckpt, tmp_path / "local", *args, env=env)
    assert local.returncode == 0, local.stderr
    remote = run("convert", ckpt, f"s3://{BUCKET}/demo/model", *args, env=env)
    assert remote.returncode == 0, remote.stderr
    downloaded = s3_server.download(BUCKET, "demo/model", None)
    assert len([n for n in downloaded if n.endswith(".safetensors")]) > 1
    same_output(downloaded, files_of(tmp_path / "local"))
    assert uploads_in_progress(s3_server, "demo/model") == []
    verified = run("verify", ckpt, f"s3://{BUCKET}/demo/model", env=env)
    assert verified.returncode == 0, verified.stderr + verified.stdout
    again = run("convert", ckpt, f"s3://{BUCKET}/demo/model", *args, env=env)     # finished: nothing to do
    assert again.returncode == 0 and "already converted" in again.stdout, again.stderr


def test_fsdp2_from_a_bucket_into_a_bucket(s3_server, bucket, fsdp2_url, tmp_path):
    """A torch-written FSDP2 checkpoint read from s3:// and written to s3:// with --verify, two workers."""
    folder, url = fsdp2_url
    env = s3.env_for(s3_server)
    local = run("convert", folder, tmp_path / "local", "--no-config", env=env)
    assert local.returncode == 0, local.stderr
    remote = run("convert", url, f"s3://{BUCKET}/fsdp2/hf", "--no-config", "--verify", "--workers", "2", env=env)
    assert remote.returncode == 0, remote.stderr
    same_output(s3_server.download(BUCKET, "fsdp2/hf", None), files_of(tmp_path / "local"))
