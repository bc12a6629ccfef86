"""Converting INTO Google Cloud Storage, against a real GCS-protocol server: fake-gcs-server over HTTP on
localhost (`gcs_server`, tests/support/gcs_server.py) and the real client stack (fsspec + gcsfs). streamconv runs as
a user runs it (`python -m streamconv` with the emulator's standard variables); the prefix it writes is
downloaded through the JSON API and compared byte for byte with a local conversion of the same checkpoint.

The commit protocol is S3's (output/remote_staging.py, docs/remote.md) through the same code: a staging prefix,
the lock created with ifGenerationMatch=0, shards composed from parts, streamconv.json published last.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from streamconv.fs import remote as remote_fs
from tests.support import gcs_server as gcs
from tests.support.remote_outputs import (files_of, only_a_staging_prefix_left, run, same_output,
                                          unfinished_refused_then_resumed)
from tests.support.s3_server import FaultProxy     # an HTTP proxy: S3's or GCS's requests alike

BUCKET = "ghfout"


@pytest.fixture(scope="module")
def env(gcs_server):
    gcs_server.bucket(BUCKET)
    return gcs.env_for(gcs_server)


@pytest.fixture(scope="module")
def local_demo(demo_checkpoint, tmp_path_factory, env):
    """The demo converted locally, sharded (200 KB), config copied: {name: bytes}."""
    ckpt = Path(demo_checkpoint.ckpt_dir)
    out = tmp_path_factory.mktemp("gcs-local") / "local"
    local = run("convert", ckpt, out, "--no-config", "--max-shard-size", "200KB", env=env)
    assert local.returncode == 0, local.stderr
    return files_of(out)


def test_demo_converted_into_gcs_is_the_local_conversion_byte_for_byte(gcs_server, env, demo_checkpoint,
                                                                       local_demo):
    """Sharded, two workers, --verify; the downloaded prefix equals the local output file for file (no staging
    prefix, no lock, no part left); verify passes on it; a second run finds it finished."""
    ckpt, url = Path(demo_checkpoint.ckpt_dir), f"gs://{BUCKET}/demo/model"
    args = ["--no-config", "--max-shard-size", "200KB"]
    remote = run("convert", ckpt, url, *args, "--workers", "2", "--verify", env=env)
    assert remote.returncode == 0, remote.stderr
    downloaded = gcs_server.download(BUCKET, "demo/model")
    assert len([n for n in downloaded if n.endswith(".safetensors")]) > 1
    same_output(downloaded, local_demo)
    verified = run("verify", ckpt, url, env=env)
    assert verified.returncode == 0, verified.stderr + verified.stdout
    again = run("convert", ckpt, url, *args, env=env)
    assert again.returncode == 0 and "already converted" in again.stdout, again.stderr


def killed(result) -> bool:
    return result.returncode == -9


def test_killed_mid_upload_then_resumed_keeps_the_uploaded_shards(gcs_server, env, demo_checkpoint, local_demo):
    """Killed while the third shard's parts are being uploaded: the prefix holds only the staging prefix and the
    lock naming it (verify: not finished; a plain run: refused), `--resume` keeps the two composed shards (size
    and CRC-32 read back) and publishes the local conversion byte for byte."""
    ckpt, prefix = Path(demo_checkpoint.ckpt_dir), "killed/model"
    url = f"gs://{BUCKET}/{prefix}"
    args = ["--no-config", "--max-shard-size", "200KB", "--workers", "1"]
    first = run("convert", ckpt, url, *args, env=dict(env, STREAMCONV_TEST_KILL_AT="mid-shard@3"))
    assert killed(first), first.stderr
    only_a_staging_prefix_left(gcs_server.download(BUCKET, prefix))
    # (a killed upload's parts are objects under the staging prefix, deleted by --resume: a 200 KB shard is one
    # part, uploaded once full, so here there are none; tests/fs/test_gcs_objects.py kills uploads with parts)
    unfinished_refused_then_resumed(ckpt, url, args, env, kept="resumed: kept 2 of")
    same_output(gcs_server.download(BUCKET, prefix), local_demo)


def test_killed_while_publishing_then_resumed_and_overwrite_replaces_the_old_files(gcs_server, env,
                                                                                   demo_checkpoint, local_demo):
    """--overwrite of a one-shard output by a sharded one, killed after the old record was deleted: unfinished
    (verify exit 3), `--resume` publishes the staged output and the old model.safetensors is gone."""
    ckpt, prefix = Path(demo_checkpoint.ckpt_dir), "replaced/model"
    url = f"gs://{BUCKET}/{prefix}"
    assert run("convert", ckpt, url, "--no-config", env=env).returncode == 0
    args = ["--no-config", "--overwrite", "--max-shard-size", "200KB"]
    first = run("convert", ckpt, url, *args, env=dict(env, STREAMCONV_TEST_KILL_AT="promote"))
    assert killed(first), first.stderr
    assert "streamconv.json" not in gcs_server.download(BUCKET, prefix)
    assert run("verify", ckpt, url, env=env).returncode == 3
    resumed = run("convert", ckpt, url, *args, "--resume", env=env)
    assert resumed.returncode == 0, resumed.stderr
    same_output(gcs_server.download(BUCKET, prefix), local_demo)


# `make test-slow`: the demo test above writes into gs:// and test_gcs.py reads FSDP2 from it, each byte for byte.
@pytest.mark.slow
def test_fsdp2_from_gcs_into_gcs(gcs_server, env, dcp_checkpoints, tmp_path):
    folder = dcp_checkpoints["fsdp2"]
    url = gcs_server.upload(folder, "gckpts-out", "fsdp2")
    local = run("convert", folder, tmp_path / "local", "--no-config", env=env)
    assert local.returncode == 0, local.stderr
    remote = run("convert", url, f"gs://{BUCKET}/fsdp2/hf", "--no-config", env=env)
    assert remote.returncode == 0, remote.stderr
    same_output(gcs_server.download(BUCKET, "fsdp2/hf"), files_of(tmp_path / "local"))


def test_shard_jobs_run_apart_upload_their_own_shards_into_gcs(gcs_server, env, demo_checkpoint, local_demo):
    """SeparateRunner (Ray's stand-in: each job pickled, written by `write_job_alone` where it lands) into gs://:
    each job composes its own shard and records it in the staging prefix's ledger; the driver publishes."""
    ckpt = Path(demo_checkpoint.ckpt_dir)
    script = ("import sys, streamconv\nfrom streamconv.runs.runners import SeparateRunner\n"
              "streamconv.convert(sys.argv[1], sys.argv[2], no_config=True, shard_runner=SeparateRunner(),\n"
              "                   max_shard_size='200KB')\n")
    result = subprocess.run([sys.executable, "-c", script, str(ckpt), f"gs://{BUCKET}/apart/hf"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    same_output(gcs_server.download(BUCKET, "apart/hf"), local_demo)


def test_batch_into_gcs_then_skips_what_is_finished(gcs_server, env, dcp_checkpoints):
    """`batch 'gs://…/checkpoint-*' -o 'gs://…/{name}'`: both converted, their records published; a second run
    skips both (finished: the definition verify uses)."""
    for step in (100, 200):
        gcs_server.upload(dcp_checkpoints["fsdp2"], "gruns", f"run/checkpoint-{step}")
    template = f"gs://{BUCKET}/batch/{{name}}"
    first = run("batch", "gs://gruns/run/checkpoint-*", "-o", template, "--no-config", "--json", env=env)
    assert first.returncode == 0, first.stderr + first.stdout
    assert [i["status"] for i in json.loads(first.stdout)["checkpoints"]] == ["converted", "converted"]
    assert "streamconv.json" in gcs_server.download(BUCKET, "batch/checkpoint-200")
    again = run("batch", "gs://gruns/run/checkpoint-*", "-o", template, "--no-config", "--json", env=env)
    assert again.returncode == 0, again.stderr
    assert [i["status"] for i in json.loads(again.stdout)["checkpoints"]] == ["skipped", "skipped"]


def _failing_part_uploads(method, path, headers):
    """Every upload of a shard's part (a media upload under `.streamconv-uploads/`) answered 503."""
    return "503" if method == "POST" and "uploadType=media" in path else None


def test_a_failing_destination_is_exit_73_and_the_previous_output_survives(gcs_server, env, demo_checkpoint):
    """A finished output is at the prefix; a run replacing it (--overwrite, other shards) meets a service that
    answers every part upload 503: exit 73 naming the URL and the service's error, after streamconv's rounds
    only (each part tried RETRY_ATTEMPTS times, gcsfs's own loop cut), no traceback; the previous output is
    still there byte for byte (no staging prefix, no part, no lock left) and verify still passes."""
    ckpt, prefix = Path(demo_checkpoint.ckpt_dir), "kept/model"
    url = f"gs://{BUCKET}/{prefix}"
    first = run("convert", ckpt, url, "--no-config", env=env)
    assert first.returncode == 0, first.stderr
    before = gcs_server.download(BUCKET, prefix)
    tries = {}

    def fault(method, path, headers):
        what = _failing_part_uploads(method, path, headers)
        if what:
            tries[path] = tries.get(path, 0) + 1
        return what

    proxy = FaultProxy(gcs_server.url, fault)
    try:
        failed = run("convert", ckpt, url, "--no-config", "--overwrite", "--max-shard-size", "200KB",
                     env=dict(env, STORAGE_EMULATOR_HOST=proxy.url))
    finally:
        proxy.stop()
    assert failed.returncode == 73, failed.stderr
    assert url in failed.stderr and "uploading part 1" in failed.stderr and "503" in failed.stderr, failed.stderr
    assert "Traceback" not in failed.stderr, failed.stderr
    assert tries and max(tries.values()) == remote_fs.RETRY_ATTEMPTS, tries
    assert gcs_server.download(BUCKET, prefix) == before
    verified = run("verify", ckpt, url, env=env)
    assert verified.returncode == 0, verified.stderr
