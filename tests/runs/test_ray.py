"""Ray scale-out on a REAL local Ray cluster (no mocks): shards written by Ray tasks equal a local conversion byte
for byte, a worker killed mid-shard is retried to the same bytes, and a batch with a broken checkpoint finishes
the others. One cluster for the module (starting one costs ~8 s on 2 cores)."""
import os
import shutil
from pathlib import Path

import pytest

import streamconv
from streamconv import failpoints
from streamconv.runs.report import CollectingReporter

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray

SHARD = "100KB"
REPO = Path(__file__).resolve().parents[2]   # the tree under test: its streamconv is what workers must import


def files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_server, gcs_server):
    kill_dir = tmp_path_factory.mktemp("ray-kill")
    # The local S3 and GCS servers' endpoints and keys, the standard way, for the bucket tests: workers inherit them.
    saved = {k: os.environ.get(k) for k in {**s3_server.env, **gcs_server.env}}
    os.environ.update(s3_server.env)
    os.environ.update(gcs_server.env)
    # Workers inherit the environment when the cluster starts: the hook folder (inert while empty) and our code.
    os.environ[failpoints.RAY_KILL_DIR_ENV] = str(kill_dir)
    saved["PYTHONPATH"] = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")
    try:
        yield kill_dir
    finally:
        ray.shutdown()
        os.environ.pop(failpoints.RAY_KILL_DIR_ENV, None)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def local(demo_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "out"
    streamconv.convert(str(demo_checkpoint.ckpt_dir), str(out), max_shard_size=SHARD, no_config=True)
    return files(out)


def test_workers_import_the_streamconv_under_test(cluster):
    """A worker importing another streamconv (an editable install of a different tree) would test that tree."""
    @ray.remote
    def where():
        import streamconv as imported
        return imported.__file__

    assert Path(ray.get(where.remote())).resolve() == Path(streamconv.__file__).resolve()
    assert Path(streamconv.__file__).resolve().is_relative_to(REPO)


def test_shards_on_ray_equal_a_local_run(cluster, demo_checkpoint, local, tmp_path):
    from streamconv.runs import ray_runner
    report = streamconv.convert(str(demo_checkpoint.ckpt_dir), str(tmp_path / "out"), max_shard_size=SHARD,
                                no_config=True, crc=True, shard_runner=ray_runner.RayRunner())
    assert files(tmp_path / "out") == local
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]     # staging committed
    assert report.crc_checked_chunks > 0        # the tasks' CRC-32 checks reach the report, as a local run's do
    assert report.task_peak_rss_bytes > 0       # the tasks' own peak RSS, measured in their worker processes


def test_shards_on_ray_upload_into_a_bucket_and_the_driver_publishes(cluster, s3_server, demo_checkpoint, local):
    """Into s3://: each Ray task uploads its own shard into the staging prefix and records it there; the driver
    checks the ledger and publishes (record last). The downloaded prefix equals the local run."""
    import s3fs
    from streamconv.runs import ray_runner
    s3fs.S3FileSystem.clear_instance_cache()
    s3_server.bucket("ray-out")
    streamconv.convert(str(demo_checkpoint.ckpt_dir), "s3://ray-out/hf/model", max_shard_size=SHARD,
                       no_config=True, shard_runner=ray_runner.RayRunner())
    got = s3_server.download("ray-out", "hf/model", None)
    assert sorted(got) == sorted(local)
    assert all(got[name] == local[name] for name in local if name != "streamconv.json")


def test_shards_on_ray_read_from_and_upload_into_gcs(cluster, gcs_env, demo_checkpoint, local):
    """gs:// to gs://: each Ray task reads its chunks from the bucket and composes its own shard in the staging
    prefix; the driver publishes. The downloaded prefix equals the local run byte for byte."""
    from streamconv.runs import ray_runner
    source = gcs_env.upload(demo_checkpoint.ckpt_dir, "ray-gs-in", "ckpt")
    gcs_env.bucket("ray-gs-out")
    streamconv.convert(source, "gs://ray-gs-out/hf/model", max_shard_size=SHARD, no_config=True,
                       shard_runner=ray_runner.RayRunner())
    got = gcs_env.download("ray-gs-out", "hf/model")
    assert sorted(got) == sorted(local) and len([n for n in got if n.endswith(".safetensors")]) > 1
    assert all(got[name] == local[name] for name in local if name != "streamconv.json")


def test_a_worker_killed_mid_shard_is_retried_to_the_same_bytes(cluster, demo_checkpoint, local, tmp_path):
    from streamconv.runs import ray_runner
    plan = streamconv.plan(str(demo_checkpoint.ckpt_dir), max_shard_size=SHARD, no_config=True)
    victim = max(plan.shards, key=lambda s: len(s.tensors)).filename     # several tensors: "mid-shard" exists
    (cluster / f"kill-{victim}").touch()
    streamconv.convert(str(demo_checkpoint.ckpt_dir), str(tmp_path / "out"), max_shard_size=SHARD, no_config=True,
                       shard_runner=ray_runner.RayRunner())
    assert not (cluster / f"kill-{victim}").exists()            # the hook fired...
    pid = int((cluster / f"killed-{victim}").read_text())
    with pytest.raises(ProcessLookupError):                     # ...its worker is gone...
        os.kill(pid, 0)
    assert files(tmp_path / "out") == local                     # ...and the retry wrote the same bytes


def test_a_batch_on_ray_with_a_broken_checkpoint(cluster, demo_checkpoint, local, tmp_path):
    for name in ("step-1", "step-2", "step-3"):
        shutil.copytree(demo_checkpoint.ckpt_dir, tmp_path / "runs" / name, ignore=shutil.ignore_patterns("hf_config"))
    (tmp_path / "runs/step-2/.metadata").write_bytes(b"\x80\x04garbage")
    progress = CollectingReporter()
    report = streamconv.convert_many([str(tmp_path / "runs/step-*")], str(tmp_path / "hf/{step}"), ray="local",
                                     jobs=2, max_shard_size=SHARD, no_config=True, reporter=progress)
    assert [i.status for i in report.items] == ["converted", "failed", "converted"]
    # each checkpoint's shard tasks measured their own peak RSS, in the report and its --json
    assert [i.task_peak_rss_bytes > 0 for i in report.items] == [True, False, True]
    assert [c["task_peak_rss_bytes"] for c in report.to_dict()["checkpoints"]] == [
        i.task_peak_rss_bytes for i in report.items]
    plan = streamconv.plan(str(tmp_path / "runs/step-1"), max_shard_size=SHARD, no_config=True)
    assert progress.done_bytes == 2 * plan.total_bytes         # the two good ones, shard by shard
    assert files(tmp_path / "hf/1") == local == files(tmp_path / "hf/3")
    assert not (tmp_path / "hf/2").exists()
    again = streamconv.convert_many([str(tmp_path / "runs/step-*")], str(tmp_path / "hf/{step}"), ray="local",
                                    max_shard_size=SHARD, no_config=True)
    assert [i.status for i in again.items] == ["skipped", "failed", "skipped"]
