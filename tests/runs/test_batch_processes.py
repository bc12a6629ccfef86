"""`batch`'s job processes: they die with their driver (a `kill -9` of the driver leaves nothing converting and the
rerun resumes), and `streamconv.convert_many` works from a plain script without a main guard, from
`python - <<EOF` and from notebook-like cells, running the caller's top level exactly once. Real checkpoints."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import streamconv

REPO = Path(__file__).resolve().parents[2]
SHARD = "100KB"
ENV = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def files(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def single(demo_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "out"
    streamconv.convert(str(demo_checkpoint.ckpt_dir), str(out), max_shard_size=SHARD, no_config=True)
    return files(out)


@pytest.fixture
def runs(demo_checkpoint, tmp_path):
    for rel in ("a/checkpoint-100", "a/checkpoint-200"):
        shutil.copytree(demo_checkpoint.ckpt_dir, tmp_path / "runs" / rel, ignore=shutil.ignore_patterns("hf_config"))
    return tmp_path


def _children(pid: int) -> list:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    """Running or stopped; a zombie (dead, waiting for a reaper that a container may not have) is gone."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _kill_driver_mid_run(runs: Path, extra_env: dict) -> list:
    """Start a batch whose job stops itself (SIGSTOP) after its second shard, SIGKILL the driver; the job pids."""
    args = ["batch", "runs/a/checkpoint-100", "-o", "hf/{name}", "--no-config", "--max-shard-size", SHARD]
    env = dict(ENV, STREAMCONV_TEST_KILL_AT="between-shards@2", STREAMCONV_TEST_KILL_SIGNALS="STOP", **extra_env)
    driver = subprocess.Popen([sys.executable, "-m", "streamconv", *args], cwd=runs, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = runs / "hf/.checkpoint-100.streamconv-partial/.streamconv-resume"
    deadline = time.monotonic() + 90
    while len(list(records.glob("*.safetensors.json"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    jobs = _children(driver.pid)
    assert jobs, "the batch started no job process"
    driver.kill()
    driver.wait()
    return jobs


def _rerun_resumes(runs: Path, single: dict) -> None:
    again = subprocess.run([sys.executable, "-m", "streamconv", "batch", "runs/a/checkpoint-100", "-o", "hf/{name}",
                            "--no-config", "--max-shard-size", SHARD, "--json"], cwd=runs, env=ENV,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["checkpoints"][0]["status"] == "resumed"
    assert files(runs / "hf/checkpoint-100") == single


def test_jobs_die_with_a_killed_driver_and_the_rerun_resumes(runs, single):
    jobs = _kill_driver_mid_run(runs, {})
    deadline = time.monotonic() + 5
    while any(map(_alive, jobs)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(map(_alive, jobs)), "a job outlived its SIGKILLed driver"
    assert not (runs / "hf/checkpoint-100").exists()
    _rerun_resumes(runs, single)


def test_without_pdeathsig_the_stdin_watch_ends_the_job(runs, single):
    """The portable half: with the prctl skipped, a job that runs on after its driver died ends itself."""
    jobs = _kill_driver_mid_run(runs, {"STREAMCONV_TEST_NO_PDEATHSIG": "1"})
    time.sleep(0.5)
    assert all(map(_alive, jobs))       # stopped, not dead: the prctl really was skipped
    for pid in jobs:
        os.kill(pid, signal.SIGCONT)
    deadline = time.monotonic() + 5
    while any(map(_alive, jobs)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(map(_alive, jobs)), "a job outlived its SIGKILLed driver"
    assert not (runs / "hf/checkpoint-100").exists()      # killed, not left to finish unseen
    _rerun_resumes(runs, single)


SCRIPT = """\
import json, os, streamconv
with open(os.environ["MARK"], "a") as mark:
    mark.write("top level ran\\n")
report = streamconv.convert_many([os.environ["RUNS"] + "/a/checkpoint-*"], os.environ["OUT"] + "/{name}",
                                 max_shard_size="100KB", no_config=True, jobs=2)
print(json.dumps([[i.status, i.error] for i in report.items]))
"""

NOTEBOOK = """\
import code, os
cells = [
    "import json, os, streamconv",
    "with open(os.environ['MARK'], 'a') as mark:\\n    mark.write('top level ran\\\\n')\\n",
    "report = streamconv.convert_many([os.environ['RUNS'] + '/a/checkpoint-*'], os.environ['OUT'] + '/{name}', "
    "max_shard_size='100KB', no_config=True, jobs=2)",
    "print(json.dumps([[i.status, i.error] for i in report.items]))",
]
shell = code.InteractiveInterpreter({"__name__": "__main__"})
for cell in cells:
    assert shell.runsource(cell, "<cell>", "exec") is False
"""


@pytest.mark.parametrize("how", ["script without a main guard", "python - <<EOF", "notebook cells"])
def test_convert_many_from_a_script_a_heredoc_and_a_notebook(runs, single, tmp_path, how):
    mark, out = tmp_path / "mark", tmp_path / "out"
    env = dict(ENV, MARK=str(mark), RUNS=str(runs / "runs"), OUT=str(out))
    if how == "script without a main guard":
        (tmp_path / "convert.py").write_text(SCRIPT)
        argv, stdin = [sys.executable, str(tmp_path / "convert.py")], None
    elif how == "python - <<EOF":
        argv, stdin = [sys.executable, "-"], SCRIPT
    else:
        argv, stdin = [sys.executable, "-c", NOTEBOOK], None
    result = subprocess.run(argv, input=stdin, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=180)
    assert result.returncode == 0, result.stderr
    assert "Fatal Python error" not in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == [["converted", None], ["converted", None]], result.stdout
    assert mark.read_text() == "top level ran\n"       # once: no job imported the caller's __main__ again
    for name in ("checkpoint-100", "checkpoint-200"):
        assert files(out / name) == single


def test_resume_and_discard_partial_do_what_the_advice_says(runs, demo_checkpoint, tmp_path):
    """A killed job's staging folder cannot be resumed with other options: the failure advises --discard-partial,
    and `batch --discard-partial` (which batch accepts) starts that checkpoint over, byte-identical to convert."""
    def batch(*extra, env=None):
        return subprocess.run([sys.executable, "-m", "streamconv", "batch", "runs/a/checkpoint-100", "-o", "hf/{name}",
                               "--no-config", "--json", *extra], cwd=runs, env=dict(ENV, **(env or {})),
                              capture_output=True, text=True, timeout=120)

    killed = batch("--max-shard-size", SHARD, env={"STREAMCONV_TEST_KILL_AT": "between-shards@3"})
    assert json.loads(killed.stdout)["checkpoints"][0]["kind"] == "WorkerDied", killed.stdout
    other = batch("--max-shard-size", "200KB")
    failure = json.loads(other.stdout)["checkpoints"][0]
    assert "Fatal Python error" not in other.stderr, other.stderr     # a job that fails fast exits cleanly
    assert other.returncode == 1 and "--discard-partial" in failure["error"], failure
    both = batch("--max-shard-size", "200KB", "--resume", "--discard-partial")
    assert both.returncode == 64 and "pass one" in both.stderr, both.stderr
    started_over = batch("--max-shard-size", "200KB", "--discard-partial")
    assert started_over.returncode == 0, started_over.stderr
    assert json.loads(started_over.stdout)["checkpoints"][0]["status"] == "converted"
    expected = tmp_path / "expected"
    streamconv.convert(str(demo_checkpoint.ckpt_dir), str(expected), max_shard_size="200KB", no_config=True)
    assert files(runs / "hf/checkpoint-100") == files(expected)
    assert not (runs / "hf/.checkpoint-100.streamconv-partial").exists()
    # --resume is what batch does anyway: accepted, and a complete output is skipped.
    again = batch("--max-shard-size", "200KB", "--resume")
    assert again.returncode == 0 and json.loads(again.stdout)["checkpoints"][0]["status"] == "skipped", again.stderr


def test_discard_partial_from_python_starts_over(runs):
    """convert_many(discard_partial=True): a job killed after its 2nd shard, twice, has 2 finished shards the
    second time too (resumed, it would have 4)."""
    env = dict(ENV, STREAMCONV_TEST_KILL_AT="between-shards@2")
    code = ("import streamconv, sys; r = streamconv.convert_many(['runs/a/checkpoint-100'], 'hf/{name}', "
            "max_shard_size='100KB', no_config=True, discard_partial=True); print(r.items[0].kind)")
    for _ in range(2):
        result = subprocess.run([sys.executable, "-c", code], cwd=runs, env=env, capture_output=True, text=True,
                                timeout=120)
        assert result.stdout.strip() == "WorkerDied", result.stderr
        records = runs / "hf/.checkpoint-100.streamconv-partial/.streamconv-resume"
        assert len(list(records.glob("*.safetensors.json"))) == 2


def test_a_job_that_cannot_start_or_dies_at_start(runs, monkeypatch):
    from streamconv.runs import batch as batching, batch_job
    from streamconv.errors import ResourceError
    sources = [str(runs / "runs/a/checkpoint-*")]
    # Dies before reading its job: that checkpoint fails with the job's exit code, the batch goes on.
    monkeypatch.setattr(batch_job, "command", lambda fd: [sys.executable, "-c", "import sys; sys.exit(3)"])
    report = streamconv.convert_many(sources, str(runs / "out/{name}"), max_shard_size=SHARD, no_config=True)
    assert [(i.kind, "exit code 3" in i.error) for i in report.items] == [("WorkerDied", True)] * 2
    assert not (runs / "out").exists() or not any((runs / "out").iterdir())

    def no_processes(*args, **kwargs):
        raise OSError(11, "Resource temporarily unavailable")
    monkeypatch.setattr(batching.subprocess, "Popen", no_processes)
    with pytest.raises(ResourceError, match="cannot start a batch job.*lower --jobs"):
        streamconv.convert_many(sources, str(runs / "out/{name}"), max_shard_size=SHARD, no_config=True)
