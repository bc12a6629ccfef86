"""Checkpoints in object storage (issue 21), against a real S3-protocol server: moto over HTTP on localhost
(`s3_server`, tests/support/s3_server.py) and the real client stack (fsspec + s3fs). Nothing here mocks our own
code: torch-written checkpoints are uploaded with boto3, streamconv runs as a user runs it (`python -m streamconv`
with the standard AWS_* variables), and its output is compared byte for byte with the local conversion's.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from streamconv.demo_checkpoint import run_distributed
from tests.support import s3_server as s3
from tests.support.remote_outputs import failed_as_changed, files_of, held_its_prediction, run, same_inspect_and_plan
from tests.support.remote_outputs import same_output as same_files

# Written by torch once per module: a zstd-compressed FSDP2 checkpoint and safetensors-serialized DCP.
_ZSTD = "tests.support.zstd_writers:write_zstd_ranks3"


def same_output(remote_out: Path, local_out: Path) -> None:
    """The two output folders equal file for file (remote_outputs.same_output says what may differ)."""
    same_files(files_of(remote_out), files_of(local_out))


@pytest.fixture(scope="module")
def flavors_written(tmp_path_factory):
    out = tmp_path_factory.mktemp("remote-flavors")
    run_distributed(_ZSTD, 3, dict(out_dir=str(out)))
    from tests.support import st_writers
    st_writers.build(out, ["st_fsdp2_optim", "hf_fsdp2"])
    return out


@pytest.fixture(scope="module")
def uploaded(s3_server, dcp_checkpoints, demo_checkpoint, flavors_written):
    """{name: (local folder, s3:// URL)} of every checkpoint the tests convert from the bucket."""
    local = {"demo": Path(demo_checkpoint.ckpt_dir),
             "fsdp2": dcp_checkpoints["fsdp2"], "tp": dcp_checkpoints["tp"],
             "mesh2d": dcp_checkpoints["mesh2d"], "zstd_fsdp2": flavors_written / "zstd_fsdp2",
             "st_fsdp2_optim": flavors_written / "st_fsdp2_optim", "hf_fsdp2": flavors_written / "hf_fsdp2"}
    return {name: (folder, s3_server.upload(folder, "ckpts", name)) for name, folder in local.items()}


@pytest.fixture(scope="module")
def converted_locally(uploaded, tmp_path_factory):
    """`convert <local folder> --no-config` of an uploaded checkpoint, run once per module: {name: output folder}."""
    done = {}

    def output_of(name: str) -> Path:
        if name not in done:
            out = tmp_path_factory.mktemp(f"local-{name}") / "local"
            local = run("convert", uploaded[name][0], out, "--no-config")
            assert local.returncode == 0, local.stderr
            done[name] = out
        return done[name]
    return output_of


# "tp" runs in `make test-slow`: test_shard_jobs_run_apart_read_the_bucket_themselves converts it from the bucket
# byte for byte in `make test`, and every other layout here reads plain DCP through the same ranged reads.
@pytest.mark.parametrize("name", ["demo", "fsdp2", pytest.param("tp", marks=pytest.mark.slow), "mesh2d", "zstd_fsdp2",
                                  "st_fsdp2_optim", "hf_fsdp2"])
def test_converts_from_s3_byte_for_byte_as_from_disk(uploaded, converted_locally, s3_server, name, tmp_path):
    _, url = uploaded[name]
    env = s3.env_for(s3_server)
    remote = run("convert", url, tmp_path / "remote", "--no-config", "--crc", "--json", env=env)
    assert remote.returncode == 0, remote.stderr
    held_its_prediction(remote)
    same_output(tmp_path / "remote", converted_locally(name))
    verified = run("verify", url, tmp_path / "remote", env=env)
    assert verified.returncode == 0, verified.stderr


def test_inspect_and_plan_read_only_the_metadata_from_s3(uploaded, s3_server):
    same_inspect_and_plan(*uploaded["fsdp2"], s3.env_for(s3_server))


def test_config_from_in_the_bucket(uploaded, s3_server, tmp_path):
    """The demo's config folder read from the bucket: --config-from s3://.../hf_config, sidecars copied."""
    folder, url = uploaded["demo"]
    env = s3.env_for(s3_server)
    result = run("convert", url, tmp_path / "out", "--config-from", f"{url}/hf_config", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == \
        json.loads((folder / "hf_config" / "config.json").read_text())
    local = run("convert", folder, tmp_path / "local", "--config-from", folder / "hf_config", env=env)
    assert local.returncode == 0, local.stderr
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == \
        (tmp_path / "local" / "model.safetensors").read_bytes()


def test_batch_over_an_s3_glob_and_its_skip(s3_server, dcp_checkpoints, tmp_path):
    """`batch 's3://bucket/run/checkpoint-*'`: each checkpoint converted, a second run skips them all."""
    for step in (100, 200):
        s3_server.upload(dcp_checkpoints["fsdp2"], "runs", f"run/checkpoint-{step}")
    env = s3.env_for(s3_server)
    template = str(tmp_path / "hf" / "{name}")
    first = run("batch", "s3://runs/run/checkpoint-*", "-o", template, "--no-config", "--json", env=env)
    assert first.returncode == 0, first.stderr + first.stdout
    items = json.loads(first.stdout)["checkpoints"]
    assert [i["status"] for i in items] == ["converted", "converted"]
    assert [i["source"] for i in items] == ["s3://runs/run/checkpoint-100", "s3://runs/run/checkpoint-200"]
    assert (tmp_path / "hf" / "checkpoint-200" / "model.safetensors").is_file()
    again = run("batch", "s3://runs/run/checkpoint-*", "-o", template, "--no-config", "--json", env=env)
    assert again.returncode == 0, again.stderr
    assert [i["status"] for i in json.loads(again.stdout)["checkpoints"]] == ["skipped", "skipped"]


def test_run_folder_in_a_bucket_is_searched_like_a_local_one(uploaded, s3_server, tmp_path):
    """A URL above the DCP folder is a run folder: discovery lists the bucket as it lists a disk."""
    folder, _ = uploaded["fsdp2"]
    s3_server.upload(folder, "ckpts", "titan/checkpoint/step-7")
    result = run("convert", "s3://ckpts/titan", tmp_path / "out", "--no-config", env=s3.env_for(s3_server))
    assert result.returncode == 0, result.stderr
    assert "s3://ckpts/titan/checkpoint/step-7" in result.stdout


# -- credentials, endpoints, the extra ------------------------------------------------------------------------


def test_storage_options_reach_the_client_and_secrets_are_never_printed(uploaded, s3_server, tmp_path):
    _, url = uploaded["fsdp2"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    options = {"endpoint_url": s3_server.url, "key": s3.CREDENTIALS["AWS_ACCESS_KEY_ID"],
               "secret": s3.CREDENTIALS["AWS_SECRET_ACCESS_KEY"]}
    good = run("inspect", url, "--storage-options", json.dumps(options), env=env)
    assert good.returncode == 0, good.stderr
    # The wrong endpoint (nothing listens there): exit 2, the URL named, the secret never shown.
    bad = dict(options, endpoint_url="http://127.0.0.1:9", config_kwargs={"retries": {"max_attempts": 1}})
    failed = run("convert", url, tmp_path / "out", "--storage-options", json.dumps(bad), env=env)
    assert failed.returncode == 2, failed.stderr
    assert url in failed.stderr and "Traceback" not in failed.stderr
    for text in (failed.stderr, failed.stdout, good.stdout, good.stderr):
        assert options["secret"] not in text
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, message", [("{bad", "not valid JSON"), ("[1]", "must be a JSON object")])
def test_bad_storage_options_are_usage_errors(text, message):
    result = run("inspect", "s3://bucket/x", "--storage-options", text)
    assert result.returncode == 64 and message in result.stderr and "Traceback" not in result.stderr


def test_a_url_without_the_remote_extra_gets_the_install_hint():
    script = ("import sys; sys.modules['fsspec'] = None\n"      # as if `pip install streamconv` only
              "from streamconv.cli import main\n"
              "sys.argv = ['streamconv', 'inspect', 's3://bucket/ckpt']\nmain()\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 64, result.stderr
    assert result.stderr.strip() == ("error: s3://bucket/ckpt: reading or writing a URL needs the remote extra: "
                                     "pip install 'streamconv[remote]'")


# -- faults: retried, then the documented exit code; never a truncated tensor with exit 0 -------------------


def _object_gets(path: str) -> bool:
    return ".distcp" in path


def test_throttling_and_resets_are_retried_then_the_conversion_is_exact(uploaded, converted_locally, s3_server,
                                                                         tmp_path):
    _, url = uploaded["fsdp2"]
    seen = {"n": 0}

    def fault(method, path, headers):    # every 3rd data-file request throttled, every 5th reset
        if not _object_gets(path):
            return None
        seen["n"] += 1
        return "503" if seen["n"] % 3 == 0 else "reset" if seen["n"] % 5 == 0 else None

    proxy = s3.FaultProxy(s3_server.url, fault)
    try:
        env = s3.env_for(s3_server, proxy.url)
        result = run("convert", url, tmp_path / "out", "--no-config", env=env)
    finally:
        proxy.stop()
    assert result.returncode == 0, result.stderr
    assert proxy.faults >= 3
    same_output(tmp_path / "out", converted_locally("fsdp2"))


def test_a_burst_longer_than_the_client_retries_is_outlasted_by_ours(uploaded, converted_locally, s3_server,
                                                                      tmp_path):
    """One range answered 503 SlowDown 15 times in a row: more than the client stack retries on its own (s3fs 5
    times x botocore's AWS_MAX_ATTEMPTS=2 here), fewer than streamconv's 5 rounds of those. Exact output, exit 0."""
    _, url = uploaded["fsdp2"]
    state = {"range": None, "n": 0}

    def fault(method, path, headers):
        if not (_object_gets(path) and method == "GET"):
            return None
        key = (path, headers.get("Range"))
        state["range"] = state["range"] or key
        if key == state["range"] and state["n"] < 15:
            state["n"] += 1
            return "503"
        return None

    proxy = s3.FaultProxy(s3_server.url, fault)
    try:
        result = run("convert", url, tmp_path / "out", "--no-config", env=s3.env_for(s3_server, proxy.url))
    finally:
        proxy.stop()
    assert result.returncode == 0, result.stderr
    assert proxy.faults == 15
    same_output(tmp_path / "out", converted_locally("fsdp2"))


# "503" sits out every round of every retry layer (~30 s; `make test-slow`); that a 503 is retried is the burst test's
# point, that a source failing for good is exit 2 with no output is "reset"'s and test_server_gone_mid_run's.
@pytest.mark.parametrize("kind", [pytest.param("503", marks=pytest.mark.slow), "reset"])
def test_a_source_that_keeps_failing_is_exit_2_and_nothing_finished_looking(uploaded, s3_server, tmp_path, kind):
    _, url = uploaded["fsdp2"]
    proxy = s3.FaultProxy(s3_server.url, lambda method, path, headers: kind if _object_gets(path) and method == "GET"
                          else None)
    try:
        result = run("convert", url, tmp_path / "out", "--no-config", env=s3.env_for(s3_server, proxy.url))
    finally:
        proxy.stop()
    assert result.returncode == 2, result.stderr
    assert url in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_server_gone_mid_run_is_exit_2(uploaded, s3_server, tmp_path):
    """The proxy dies after the metadata was read: the data reads fail, exit 2, no output."""
    _, url = uploaded["mesh2d"]
    state = {"data": 0}

    def fault(method, path, headers):
        if _object_gets(path) and method == "GET":
            state["data"] += 1
            if state["data"] > 1:
                return "reset"
        return None

    proxy = s3.FaultProxy(s3_server.url, fault)
    try:
        result = run("convert", url, tmp_path / "out", "--no-config", env=s3.env_for(s3_server, proxy.url))
    finally:
        proxy.stop()
    assert result.returncode == 2, result.stderr
    assert not (tmp_path / "out").exists()


def test_a_source_object_rewritten_during_the_run_is_detected(uploaded, s3_server, tmp_path):
    """A trainer re-uploads a data file while the conversion reads: ETag changed, exit 2, nothing committed."""
    folder, _ = uploaded["fsdp2"]
    url = s3_server.upload(folder, "ckpts", "changing")
    client = s3_server.client()
    data_file = sorted(p.name for p in folder.glob("*.distcp"))[0]
    original = (folder / data_file).read_bytes()
    gate = threading.Event()

    def fault(method, path, headers):
        if _object_gets(path) and method == "GET" and not gate.is_set():
            gate.set()      # the first data read: rewrite the object (same size, other bytes) before answering
            client.put_object(Bucket="ckpts", Key=f"changing/{data_file}", Body=original[:-1] + b"\x00")
        return None

    proxy = s3.FaultProxy(s3_server.url, fault)
    try:
        result = run("convert", url, tmp_path / "out", "--no-config", env=s3.env_for(s3_server, proxy.url))
    finally:
        proxy.stop()
    assert gate.is_set()
    failed_as_changed(result, f"{url}/{data_file}", tmp_path / "out")


def test_shard_jobs_run_apart_read_the_bucket_themselves(uploaded, s3_server, tmp_path):
    """SeparateRunner (Ray's stand-in: each job pickled, the checkpoint opened again where it runs) converts from
    s3:// exactly as the threads do: every job opens its own client from the URL."""
    folder, url = uploaded["tp"]
    script = ("import sys, streamconv\nfrom streamconv.runs.runners import SeparateRunner\n"
              "streamconv.convert(sys.argv[1], sys.argv[2], no_config=True, shard_runner=SeparateRunner(),\n"
              "                   max_shard_size='100KB')\n")
    result = subprocess.run([sys.executable, "-c", script, url, str(tmp_path / "apart")], capture_output=True,
                            text=True, env=s3.env_for(s3_server), timeout=300)
    assert result.returncode == 0, result.stderr
    local = run("convert", folder, tmp_path / "local", "--no-config", "--max-shard-size", "100KB")
    assert local.returncode == 0, local.stderr
    assert len(list((tmp_path / "local").glob("model-*.safetensors"))) > 1
    same_output(tmp_path / "apart", tmp_path / "local")
