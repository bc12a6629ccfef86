"""`streamconv batch` / `convert_many`: many real checkpoints (copies of the FSDP2 demo checkpoint), byte-identical
to single conversions, reruns skip, killed jobs resume, a broken checkpoint fails alone."""
import json
import os
import re
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import streamconv
from streamconv.runs import batch, shardjob
from streamconv.errors import OptionsError
from streamconv.planning.options import ConvertOptions
from streamconv.runs.report import CollectingReporter

REPO = Path(__file__).resolve().parents[2]
SHARD = "100KB"     # several shards per checkpoint


def run(*args, env=None, cwd=None, timeout=120):
    full_env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "streamconv.cli", *map(str, args)], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=timeout)


def files(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def single(demo_checkpoint, tmp_path_factory):
    """The demo checkpoint converted once by `convert`: what every batch output must equal."""
    out = tmp_path_factory.mktemp("single") / "out"
    streamconv.convert(str(demo_checkpoint.ckpt_dir), str(out), max_shard_size=SHARD, no_config=True)
    return files(out)


@pytest.fixture
def runs(demo_checkpoint, tmp_path):
    """runs/a/checkpoint-100, runs/a/checkpoint-200, runs/b/checkpoint-100 (real checkpoints), and a broken
    runs/b/checkpoint-300 (its .metadata truncated)."""
    for rel in ("a/checkpoint-100", "a/checkpoint-200", "b/checkpoint-100", "b/checkpoint-300"):
        shutil.copytree(demo_checkpoint.ckpt_dir, tmp_path / "runs" / rel, ignore=shutil.ignore_patterns("hf_config"))
    meta = tmp_path / "runs/b/checkpoint-300/.metadata"
    meta.write_bytes(meta.read_bytes()[:100])
    return tmp_path


def test_sources_and_templates(tmp_path):
    for rel in ("r/checkpoint-10", "r/checkpoint-9", "r/checkpoint-100"):
        (tmp_path / rel).mkdir(parents=True)
    (tmp_path / "list.txt").write_text(f"# more\n\n{tmp_path}/r/checkpoint-9\n{tmp_path}/extra\n")
    found = batch.expand_sources([str(tmp_path / "r/checkpoint-*")], str(tmp_path / "list.txt"))
    assert [Path(p).name for p in found] == ["checkpoint-9", "checkpoint-10", "checkpoint-100", "extra"]
    assert batch.output_for("out/{parent}-{step}/{name}", "runs/x/step-0042") == "out/x-0042/step-0042"
    with pytest.raises(OptionsError, match="does not end in digits"):
        batch.output_for("out/{step}", "runs/final")
    with pytest.raises(OptionsError, match="unknown field"):
        batch.output_for("out/{rank}", "runs/final")
    with pytest.raises(OptionsError, match="matches no folder"):
        batch.expand_sources([str(tmp_path / "nothing-*")])
    with pytest.raises(OptionsError, match="same output"):
        streamconv.convert_many([str(tmp_path / "r/checkpoint-*")], str(tmp_path / "out/{parent}"))


def test_batch_converts_skips_and_fails_alone(runs, single):
    args = ["batch", "runs/*/checkpoint-*", "-o", "hf/{parent}-{step}", "--no-config", "--max-shard-size", SHARD,
            "--jobs", "2", "--json"]
    first = run(*args, cwd=runs)
    assert first.returncode == 1, first.stderr
    report = json.loads(first.stdout)
    status = {c["source"]: c["status"] for c in report["checkpoints"]}
    assert status == {"runs/a/checkpoint-100": "converted", "runs/a/checkpoint-200": "converted",
                      "runs/b/checkpoint-100": "converted", "runs/b/checkpoint-300": "failed"}
    broken = report["checkpoints"][-1]
    assert "truncated" in broken["error"] and broken["exit_code"] == 2 and "Traceback" not in first.stderr
    assert "error: runs/b/checkpoint-300: .metadata: malformed" in first.stderr
    for name in ("a-100", "a-200", "b-100"):
        assert files(runs / "hf" / name) == single, name        # byte for byte, and nothing else in the folder
    assert not (runs / "hf/b-300").exists()
    ok = [c for c in report["checkpoints"] if c["status"] == "converted"]
    assert all(c["bytes"] == sum(len(b) for n, b in single.items() if n.endswith(".safetensors")) for c in ok)
    assert all(c["peak_rss_bytes"] > 0 and c["seconds"] > 0 for c in ok)

    second = run(*args, cwd=runs)
    status = {c["source"]: c["status"] for c in json.loads(second.stdout)["checkpoints"]}
    assert list(status.values()) == ["skipped", "skipped", "skipped", "failed"]

    # An output that does not match its plan any more (a shard cut short) is not skipped: it is refused.
    shard = sorted((runs / "hf/a-200").glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-1])
    third = json.loads(run(*args, cwd=runs).stdout)["checkpoints"]
    assert third[1]["status"] == "failed" and "--overwrite" in third[1]["error"]


def test_killed_jobs_fail_alone_and_the_rerun_resumes(runs, single):
    args = ["batch", "runs/a/checkpoint-*", "-o", "hf/{name}", "--no-config", "--max-shard-size", SHARD, "--json"]
    killed = run(*args, cwd=runs, env={"STREAMCONV_TEST_KILL_AT": "between-shards@3"})
    assert killed.returncode == 1
    report = json.loads(killed.stdout)["checkpoints"]
    assert [c["kind"] for c in report] == ["WorkerDied", "WorkerDied"], report
    assert "signal 9" in report[0]["error"]
    assert (runs / "hf/.checkpoint-100.streamconv-partial").is_dir()
    again = run(*args, cwd=runs)
    assert again.returncode == 0, again.stderr
    report = json.loads(again.stdout)["checkpoints"]
    assert [c["status"] for c in report] == ["resumed", "resumed"]
    # The kill comes at the third record; a second writer may have finished (and recorded) a fourth shard by then,
    # which --resume keeps too: at least the three, never all six.
    kept = [int(m.group(1)) for n in report[0]["notes"] for m in [re.search(r"kept (\d+) of 6", n)] if m]
    assert kept and 3 <= kept[0] < 6, report[0]["notes"]
    for name in ("checkpoint-100", "checkpoint-200"):
        assert files(runs / "hf" / name) == single


def test_max_memory_and_the_python_api(runs, single):
    plan = streamconv.plan(str(runs / "runs/a/checkpoint-100"), max_shard_size=SHARD, no_config=True)
    too_small = streamconv.convert_many([str(runs / "runs/a/checkpoint-*")], str(runs / "out/{name}"),
                                        max_shard_size=SHARD, no_config=True, max_memory=str(plan.peak_bytes - 1))
    assert [i.status for i in too_small.items] == ["failed", "failed"]
    assert "exceeds --max-memory" in too_small.items[0].error
    # Room for one job at a time: both convert, one after the other although --jobs 2.
    notes = CollectingReporter()
    report = streamconv.convert_many([str(runs / "runs/a/checkpoint-*")], str(runs / "out/{name}"),
                                     ConvertOptions(max_shard_size=SHARD, no_config=True), jobs=2,
                                     max_memory=str(plan.peak_bytes + plan.peak_bytes // 2), reporter=notes)
    assert [i.status for i in report.items] == ["converted", "converted"] and not report.failed
    assert [n.split()[0] for n in notes.notes] == ["started", "converted", "started", "converted"], notes.notes
    unlimited = CollectingReporter()
    streamconv.convert_many([str(runs / "runs/a/checkpoint-*")], str(runs / "out2/{name}"), jobs=2,
                            max_shard_size=SHARD, no_config=True, reporter=unlimited)
    assert [n.split()[0] for n in unlimited.notes][:2] == ["started", "started"], unlimited.notes
    assert files(runs / "out/checkpoint-200") == single


def test_verify_jobs_are_scheduled_with_the_reading_back_in_their_peak(runs):
    """--verify reads every output back (numpy and the comparison's pieces): a job's scheduled peak counts it, as
    its own conversion's prediction does, so that --max-memory is not exceeded by the verifying jobs."""
    plain = streamconv.convert_many([str(runs / "runs/a/checkpoint-*")], str(runs / "plain/{name}"),
                                    max_shard_size=SHARD, no_config=True)
    verified = streamconv.convert_many([str(runs / "runs/a/checkpoint-*")], str(runs / "verified/{name}"),
                                       max_shard_size=SHARD, no_config=True, verify=True)
    assert [i.status for i in verified.items] == ["converted", "converted"]
    for p, v in zip(plain.items, verified.items):
        assert v.predicted_peak_bytes > p.predicted_peak_bytes
        assert v.peak_rss_bytes <= v.predicted_peak_bytes, (v.peak_rss_bytes, v.predicted_peak_bytes)


def test_a_plan_travels_and_its_shards_are_written_elsewhere(demo_checkpoint, single, tmp_path):
    """ShardJobs pickle; shards written by `shardjob.write_job_alone` are recognised by the driver's ledger."""
    jobs = []

    class Runner:
        def run(self, given, progress):
            jobs.append([pickle.loads(pickle.dumps(job)) for job in given])
            results = [shardjob.write_job_alone(job) for job in jobs[-1]]
            for job in jobs[-1]:    # a retry finds it recorded and does nothing
                assert shardjob.write_job_alone(job).filenames == (job.filename,)
            return results

    streamconv.convert(str(demo_checkpoint.ckpt_dir), str(tmp_path / "out"), max_shard_size=SHARD, no_config=True,
                       shard_runner=Runner())
    assert len(jobs) == 1 and len(jobs[0]) > 1 and files(tmp_path / "out") == single

    class Lazy:
        def run(self, given, progress):
            return [shardjob.write_job_alone(given[0])]     # the others never arrive

    with pytest.raises(streamconv.StreamconvError, match="no finished record"):
        streamconv.convert(str(demo_checkpoint.ckpt_dir), str(tmp_path / "out2"), max_shard_size=SHARD,
                           no_config=True, shard_runner=Lazy())
    assert not (tmp_path / "out2").exists()


def test_ctrl_c_ends_the_batch_with_130_and_the_rerun_resumes(runs, single):
    """Ctrl-C reaches the driver and every job (one process group): exit 130, no traceback, staging kept."""
    import signal
    import time
    args = ["batch", "runs/a/checkpoint-100", "-o", "hf/{name}", "--no-config", "--max-shard-size", SHARD]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               STREAMCONV_TEST_KILL_AT="between-shards@2", STREAMCONV_TEST_KILL_SIGNALS="STOP")
    proc = subprocess.Popen([sys.executable, "-m", "streamconv.cli", *args], cwd=runs, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    records = runs / "hf/.checkpoint-100.streamconv-partial/.streamconv-resume"
    deadline = time.monotonic() + 60
    while len(list(records.glob("*.safetensors.json"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)       # the job stops itself (SIGSTOP) after its second shard
    # Wait until it has: a SIGCONT sent before its own SIGSTOP would leave it stopped for good (a fresh-clone CI
    # run hung here once with a fixed 0.3 s wait).
    import psutil
    while time.monotonic() < deadline and not any(
            p.status() == psutil.STATUS_STOPPED for p in psutil.Process(proc.pid).children(recursive=True)):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    os.killpg(proc.pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "run the same command to continue" in err, err
    assert records.parent.is_dir() and not (runs / "hf/checkpoint-100").exists()
    again = run(*args, "--json", cwd=runs)
    assert json.loads(again.stdout)["checkpoints"][0]["status"] == "resumed", again.stderr
    assert files(runs / "hf/checkpoint-100") == single


def test_jobs_share_the_cpus_when_workers_is_not_given(runs, single, monkeypatch):
    """Side-by-side jobs each choose writers from their share of the CPUs (16 CPUs, 2 jobs: 8 each), not all of
    them (16 each: twice as many decoder threads as cores); an explicit --workers wins."""
    monkeypatch.setattr(batch, "available_cpus", lambda: 16.0)
    report = streamconv.convert_many([str(runs / "runs/a/checkpoint-*")], str(runs / "out/{name}"), jobs=2,
                                     max_shard_size=SHARD, no_config=True)
    assert [(i.status, i.workers) for i in report.items] == [("converted", 8), ("converted", 8)]
    assert files(runs / "out/checkpoint-100") == single
    one_job = streamconv.convert_many([str(runs / "runs/a/checkpoint-*")], str(runs / "one/{name}"), jobs=1,
                                      max_shard_size=SHARD, no_config=True)
    assert [i.workers for i in one_job.items] == [16, 16]
    explicit = streamconv.convert_many([str(runs / "runs/a/checkpoint-*")], str(runs / "three/{name}"), jobs=2,
                                       workers=3, max_shard_size=SHARD, no_config=True)
    assert [i.workers for i in explicit.items] == [3, 3]


def test_the_batch_table_shows_the_shard_tasks_peak_rss_when_there_is_one(monkeypatch):
    """--ray: each checkpoint's own row says what its shard tasks peaked at (the driver's figure is not theirs);
    without tasks the column is not there. (The report is made here: tests/runs/test_ray.py measures real ones.)"""
    from click.testing import CliRunner
    from streamconv import cli

    def report(task_rss):
        items = [batch.BatchItem("runs/a", "hf/a", "converted", 2 << 20, 1.0, 40 << 20, task_rss),
                 batch.BatchItem("runs/b", "hf/b", "skipped")]
        return batch.BatchReport(items=items, seconds=1.0, jobs=1, max_memory_bytes=None)

    for task_rss, shown in ((0, False), (300 << 20, True)):
        monkeypatch.setattr(batch, "convert_many", lambda *a, **k: report(task_rss))
        result = CliRunner().invoke(cli.cli, ["batch", "runs/*", "-o", "hf/{name}"])
        assert result.exit_code == 0, result.output
        head, converted, skipped = result.output.splitlines()[:3]
        assert ("task RSS" in head) == shown
        assert ("300.0 MiB" in converted) == shown and "40.0 MiB" in converted
        assert skipped.split()[:7] == ["skipped", "0", "B", "0.00", "0", "-"] + (["-"] if shown else ["runs/b"])
