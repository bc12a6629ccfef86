"""The runner contract (runs/runners.py): every runner writes the same shard jobs through the same path, so the
output, the source CRC-32 checks, the shards' finished records, progress and kill points are the same whoever
writes. `SeparateRunner` stands in for Ray here: it pickles each job as Ray would and writes it in a process
state of its own (tests/runs/test_ray.py runs the real thing where Ray is installed)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import streamconv
from streamconv.errors import OptionsError
from streamconv.runs import runners
from streamconv.runs.report import Reporter

SHARD = "100KB"     # several shards
REPO = Path(__file__).resolve().parents[2]


def files(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


class Counting(Reporter):
    def __init__(self):
        self.moved = 0

    def advance(self, n_bytes: int) -> None:
        self.moved += n_bytes


class Recording(runners.SeparateRunner):
    """SeparateRunner that keeps what it was given and returned."""

    def run(self, jobs, progress=None):
        self.jobs = list(jobs)
        self.results = super().run(jobs, progress)
        return self.results


@pytest.fixture(scope="module")
def by_threads(demo_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("threads") / "out"
    counting = Counting()
    report = streamconv.convert(str(demo_checkpoint.ckpt_dir), str(out), max_shard_size=SHARD, no_config=True,
                                crc=True, reporter=counting)
    return out, report, counting.moved


def test_a_separate_runner_writes_what_threads_write_with_the_same_checks(demo_checkpoint, by_threads, tmp_path):
    out, threads, threads_moved = by_threads
    runner, counting = Recording(), Counting()
    report = streamconv.convert(str(demo_checkpoint.ckpt_dir), str(tmp_path / "out"), max_shard_size=SHARD,
                                no_config=True, crc=True, reporter=counting, shard_runner=runner)
    assert files(tmp_path / "out") == files(out)
    assert report.shards > 1 and [j.filename for j in runner.jobs] == [f for f in report.files if f.endswith(
        ".safetensors")]
    # every chunk's CRC-32 checked by the workers, and counted in the report as for threads
    assert threads.crc_checked_chunks > 0
    assert (report.crc_checked_chunks, report.crc_checked_bytes) == (threads.crc_checked_chunks,
                                                                      threads.crc_checked_bytes)
    assert sum(r.crc.chunks for r in runner.results) == report.crc_checked_chunks
    assert counting.moved == threads_moved > 0      # progress adds up to the same bytes
    # a process of its own reports its peak (here the test's process stands in for it); threads report none
    assert report.task_peak_rss_bytes > 0 and threads.task_peak_rss_bytes == 0


def test_a_job_written_alone_never_reads_metadata_or_plans_again(demo_checkpoint, by_threads, tmp_path,
                                                                 monkeypatch):
    """A Ray task writes from the driver's plan (it travels in the job's context): it opens the checkpoint's files
    and locates its own shard's chunks, but neither decodes `.metadata` nor plans (both cost per task what the
    driver already paid once)."""
    from streamconv.planning import plan
    from streamconv.runs import preparing
    from streamconv.source import flavors

    def refused(*args, **kwargs):
        raise AssertionError("a shard job planned again or read .metadata")

    class Forbidding(runners.SeparateRunner):
        def run(self, jobs, progress=None):     # (the driver has planned by now: only the jobs are held to it)
            for module, name in ((plan, "build_plan"), (preparing, "build_plan"), (flavors, "open_checkpoint")):
                monkeypatch.setattr(module, name, refused)
            return super().run(jobs, progress)

    out, _, _ = by_threads
    report = streamconv.convert(str(demo_checkpoint.ckpt_dir), str(tmp_path / "out"), max_shard_size=SHARD,
                                no_config=True, shard_runner=Forbidding())
    assert report.shards > 1 and files(tmp_path / "out") == files(out)


def test_without_crc_no_runner_checks_a_chunk(demo_checkpoint, tmp_path):
    report = streamconv.convert(str(demo_checkpoint.ckpt_dir), str(tmp_path / "out"), max_shard_size=SHARD,
                                no_config=True, crc=False, shard_runner=runners.SeparateRunner())
    assert report.crc_checked_chunks == 0 and report.crc_checked_bytes == 0


def test_a_job_pickles_with_its_plan_once_per_context(demo_checkpoint, tmp_path):
    runner = Recording()
    streamconv.convert(str(demo_checkpoint.ckpt_dir), str(tmp_path / "out"), max_shard_size=SHARD, no_config=True,
                       shard_runner=runner)
    contexts = {id(j.context) for j in runner.jobs}
    assert len(runner.jobs) > 1 and len(contexts) == 1      # one shared context: Ray puts it once
    job = runner.jobs[0]
    assert job.shard.filename == job.filename and os.path.isabs(job.context.checkpoint_dir)


def test_something_that_is_not_a_runner_is_refused(demo_checkpoint, tmp_path):
    with pytest.raises(OptionsError, match="not a runner"):
        streamconv.convert(str(demo_checkpoint.ckpt_dir), str(tmp_path / "out"),
                           shard_runner=lambda job, names, progress: None)
    assert not (tmp_path / "out").exists()


_SEPARATE = """
import sys, streamconv
from streamconv.runs.runners import SeparateRunner
streamconv.convert(sys.argv[1], sys.argv[2], max_shard_size=sys.argv[3], no_config=True, resume=True,
                   shard_runner=SeparateRunner())
"""


def test_a_kill_between_shards_of_a_separate_runner_is_resumed_by_threads(demo_checkpoint, by_threads, tmp_path):
    """The kill points and finished records are the write path's, not one runner's: a separate runner killed
    after its second recorded shard leaves two shards that a threads run keeps."""
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               STREAMCONV_TEST_KILL_AT="between-shards@2")
    killed = subprocess.run([sys.executable, "-c", _SEPARATE, str(demo_checkpoint.ckpt_dir), str(out), SHARD],
                            env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    assert not out.exists()
    report = streamconv.convert(str(demo_checkpoint.ckpt_dir), str(out), max_shard_size=SHARD, no_config=True,
                                resume=True)
    # At least the two recorded before the kill; a second writer may have recorded a third by then.
    kept = [int(m.group(1)) for n in report.notes for m in [re.match(r"resumed: kept (\d+) of", n)] if m]
    assert kept and kept[0] >= 2, report.notes
    assert files(out) == files(by_threads[0])

