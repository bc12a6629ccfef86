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
from tests.support.remote_outputs import only_a_staging_prefix_left, unfinished_refused_then_resumed

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


# -- interrupted, failed and replaced outputs ------------------------------------------------------------------


def _demo(demo_checkpoint) -> Path:
    return Path(demo_checkpoint.ckpt_dir)


def killed(result) -> bool:
    return result.returncode == -9


def failing_env(server, proxy) -> dict:
    """The environment of a run through a FaultProxy that keeps failing, with botocore's own retry off
    (AWS_MAX_ATTEMPTS=1, the standard variable): under s3fs's five tries and streamconv's five rounds
    (fs/remote.py) it only multiplied the waits (~30 s asleep per run); what these tests check is how the run
    ends, and s3fs and streamconv still retry every failed request."""
    return dict(s3.env_for(server, proxy.url), AWS_MAX_ATTEMPTS="1")


def test_killed_mid_upload_then_resumed_keeps_the_uploaded_shards(s3_server, bucket, demo_checkpoint, tmp_path):
    """Killed while the third shard's upload is open: the prefix has no record (unfinished: verify says so), the
    open upload is aborted by the next run, `--resume` keeps the two uploaded shards (size and CRC-32 read back)
    and the result is the local conversion byte for byte."""
    ckpt, prefix = _demo(demo_checkpoint), "killed/model"
    url = f"s3://{BUCKET}/{prefix}"
    args = ["--no-config", "--max-shard-size", "200KB", "--workers", "1"]
    env = s3.env_for(s3_server)
    first = run("convert", ckpt, url, *args, env=dict(env, STREAMCONV_TEST_KILL_AT="mid-shard@3"))
    assert killed(first), first.stderr
    only_a_staging_prefix_left(s3_server.download(BUCKET, prefix, None))
    assert uploads_in_progress(s3_server, prefix)                              # the shard being uploaded
    unfinished_refused_then_resumed(ckpt, url, args, env, kept="resumed: kept 2 of")
    assert uploads_in_progress(s3_server, prefix) == []
    local = run("convert", ckpt, tmp_path / "local", *args, env=env)
    assert local.returncode == 0, local.stderr
    same_output(s3_server.download(BUCKET, prefix, None), files_of(tmp_path / "local"))


def _failing_uploads(method, path, headers):
    """Every upload of a shard's part answered 503 SlowDown: the destination fails mid-upload."""
    return "503" if method == "PUT" and "partNumber=" in path else None


def test_a_failing_destination_is_exit_73_and_the_previous_output_survives(s3_server, bucket, demo_checkpoint,
                                                                            tmp_path):
    """A complete output is at the prefix; a run replacing it (--overwrite, other options) meets a destination
    that fails every upload: exit 73 naming the URL and the service's error, no secret printed, nothing left
    uploading, and the previous output still there, finished, byte for byte."""
    ckpt, prefix = _demo(demo_checkpoint), "kept/model"
    url = f"s3://{BUCKET}/{prefix}"
    env = s3.env_for(s3_server)
    first = run("convert", ckpt, url, "--no-config", env=env)
    assert first.returncode == 0, first.stderr
    before = s3_server.download(BUCKET, prefix, None)
    proxy = s3.FaultProxy(s3_server.url, _failing_uploads)
    try:
        failed = run("convert", ckpt, url, "--no-config", "--overwrite", "--max-shard-size", "200KB",
                     env=failing_env(s3_server, proxy))
    finally:
        proxy.stop()
    assert failed.returncode == 73, failed.stderr
    assert url in failed.stderr and "reduce your request rate" in failed.stderr, failed.stderr
    assert "uploading part 1" in failed.stderr and "Traceback" not in failed.stderr
    assert s3.CREDENTIALS["AWS_SECRET_ACCESS_KEY"] not in failed.stderr + failed.stdout
    assert s3_server.download(BUCKET, prefix, None) == before
    assert uploads_in_progress(s3_server, prefix) == []
    verified = run("verify", ckpt, url, env=env)
    assert verified.returncode == 0, verified.stderr


def test_killed_while_publishing_then_resumed_and_overwrite_replaces_the_old_files(s3_server, bucket,
                                                                                   demo_checkpoint, tmp_path):
    """--overwrite of a one-shard output by a sharded one, killed after the old record was deleted: the prefix is
    unfinished (no record; batch and verify agree), `--resume` publishes the staged output, and the old
    model.safetensors, which the new output does not have, is gone."""
    ckpt, prefix = _demo(demo_checkpoint), "replaced/model"
    url = f"s3://{BUCKET}/{prefix}"
    env = s3.env_for(s3_server)
    assert run("convert", ckpt, url, "--no-config", env=env).returncode == 0
    args = ["--no-config", "--overwrite", "--max-shard-size", "200KB"]
    first = run("convert", ckpt, url, *args, env=dict(env, STREAMCONV_TEST_KILL_AT="promote"))
    assert killed(first), first.stderr
    assert "streamconv.json" not in s3_server.download(BUCKET, prefix, None)
    assert run("verify", ckpt, url, env=env).returncode == 3
    resumed = run("convert", ckpt, url, *args, "--resume", env=env)
    assert resumed.returncode == 0, resumed.stderr
    local = run("convert", ckpt, tmp_path / "local", "--no-config", "--max-shard-size", "200KB", env=env)
    assert local.returncode == 0, local.stderr
    same_output(s3_server.download(BUCKET, prefix, None), files_of(tmp_path / "local"))


def test_an_output_url_the_service_cannot_take_is_refused_before_reading(tmp_path):
    result = run("convert", tmp_path / "nothing-here", "memory://out/model", "--no-config")
    assert result.returncode == 73, result.stderr
    assert "memory://out/model" in result.stderr and "s3://" in result.stderr


# -- the other runners, batch ---------------------------------------------------------------------------------


def test_shard_jobs_run_apart_upload_their_own_shards(s3_server, bucket, fsdp2_url, tmp_path):
    """SeparateRunner (Ray's stand-in: each job pickled, written by `write_job_alone` where it lands) into s3://:
    every job uploads its shard and records it in the ledger in the staging prefix; the driver publishes."""
    folder, url = fsdp2_url
    script = ("import sys, streamconv\nfrom streamconv.runs.runners import SeparateRunner\n"
              "streamconv.convert(sys.argv[1], sys.argv[2], no_config=True, shard_runner=SeparateRunner(),\n"
              "                   max_shard_size='100KB')\n")
    result = subprocess.run([sys.executable, "-c", script, url, f"s3://{BUCKET}/apart/hf"], capture_output=True,
                            text=True, env=s3.env_for(s3_server), timeout=300)
    assert result.returncode == 0, result.stderr
    local = run("convert", folder, tmp_path / "local", "--no-config", "--max-shard-size", "100KB")
    assert local.returncode == 0, local.stderr
    assert len(list((tmp_path / "local").glob("model-*.safetensors"))) > 1
    same_output(s3_server.download(BUCKET, "apart/hf", None), files_of(tmp_path / "local"))


def test_batch_into_a_bucket_then_skips_what_is_finished(s3_server, bucket, dcp_checkpoints, tmp_path):
    """`batch 's3://…/checkpoint-*' -o 's3://…/{name}'`: the environment's credentials reach every job; a second
    run skips both (their records are published: finished), the same definition verify uses."""
    for step in (100, 200):
        s3_server.upload(dcp_checkpoints["fsdp2"], "runs-out", f"run/checkpoint-{step}")
    env = s3.env_for(s3_server)
    template = f"s3://{BUCKET}/batch/{{name}}"
    first = run("batch", "s3://runs-out/run/checkpoint-*", "-o", template, "--no-config", "--json", env=env)
    assert first.returncode == 0, first.stderr + first.stdout
    assert [i["status"] for i in json.loads(first.stdout)["checkpoints"]] == ["converted", "converted"]
    assert "streamconv.json" in s3_server.download(BUCKET, "batch/checkpoint-200", None)
    again = run("batch", "s3://runs-out/run/checkpoint-*", "-o", template, "--no-config", "--json", env=env)
    assert again.returncode == 0, again.stderr
    assert [i["status"] for i in json.loads(again.stdout)["checkpoints"]] == ["skipped", "skipped"]


def test_a_publication_that_fails_half_way_leaves_no_record_and_resumes(s3_server, bucket, demo_checkpoint,
                                                                        tmp_path):
    """The destination fails the server-side copy of the second shard while publishing: exit 73, and the prefix
    has shards but no streamconv.json (the record is copied last), so verify calls it unfinished; the staged
    output is kept and `--resume` publishes it."""
    ckpt, prefix = _demo(demo_checkpoint), "halfway/model"
    url = f"s3://{BUCKET}/{prefix}"
    args = ["--no-config", "--max-shard-size", "200KB"]
    seen = {"copies": 0}

    def fault(method, path, headers):
        if method == "PUT" and headers.get("x-amz-copy-source") and path.endswith(".safetensors"):
            seen["copies"] += 1
            return "503" if seen["copies"] > 1 else None
        return None

    proxy = s3.FaultProxy(s3_server.url, fault)
    try:
        failed = run("convert", ckpt, url, *args, env=failing_env(s3_server, proxy))
    finally:
        proxy.stop()
    assert failed.returncode == 73, failed.stderr
    assert "--resume" in failed.stderr and "Traceback" not in failed.stderr
    published = s3_server.download(BUCKET, prefix, None)
    assert any(n.endswith(".safetensors") and "/" not in n for n in published)
    assert "streamconv.json" not in published
    env = s3.env_for(s3_server)
    assert run("verify", ckpt, url, env=env).returncode == 3
    resumed = run("convert", ckpt, url, *args, "--resume", env=env)
    assert resumed.returncode == 0, resumed.stderr
    local = run("convert", ckpt, tmp_path / "local", *args, env=env)
    assert local.returncode == 0, local.stderr
    same_output(s3_server.download(BUCKET, prefix, None), files_of(tmp_path / "local"))
