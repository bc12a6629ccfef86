"""The staging folder as an attacker or a careless operator finds it (issue 16: items 3, 4, 8, 12, 16, 19, 21).

A killed run leaves `.out.streamconv-partial/` in what may be a shared scratch folder. What is planted there
(symlinks into the checkpoint, probe files, stray files, another user's folder) is never written through,
never published, and refused with exit 73 naming it. Filesystems without flock fall back to a lock file.
The source checkpoint's bytes and mtimes are checked after every test (the `source` fixture, tests/conftest.py).
"""
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest
from click.testing import CliRunner

import streamconv
from streamconv.fs import fastpaths
from streamconv import failpoints
from streamconv.fs import outfiles
from streamconv.output import durable, staging
from streamconv.cli import cli
from streamconv.errors import OutputError
from streamconv.output.sink import FileSink
from tests.support.safety import REPO, SHARD, convert, hidden, no_traceback, snapshot, tree_bytes


def killed_with_two_shards(source, out):
    killed = convert(source, out, "--workers", "1", env={failpoints.KILL_AT_ENV: "between-shards@2"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    stage = out.parent / ".out.streamconv-partial"
    shards = sorted(n for n in source["expected"] if n.endswith(".safetensors"))
    assert sorted(p.name for p in stage.glob("*.safetensors")) == shards[:2]
    return stage, shards


def a_source_file(source):
    return sorted(source["ckpt"].glob("*.distcp"))[0]


# -- 16.3: symlinks planted in the staging folder -----------------------------------------------------------

@pytest.mark.parametrize("which", ["kept", "unwritten"])
def test_a_planted_shard_symlink_is_refused_and_never_written_through(source, tmp_path, which):
    out = tmp_path / "out"
    stage, shards = killed_with_two_shards(source, out)
    name = shards[0] if which == "kept" else shards[2]
    (stage / name).unlink(missing_ok=True)
    (stage / name).symlink_to(os.path.relpath(a_source_file(source), stage))
    resumed = convert(source, out, "--resume")
    assert resumed.returncode == 73 and no_traceback(resumed), resumed.stderr
    assert str(stage / name) in resumed.stderr and "symbolic link" in resumed.stderr
    assert "--discard-partial" in resumed.stderr and not out.exists()
    again = convert(source, out, "--discard-partial")
    assert again.returncode == 0, again.stderr
    assert tree_bytes(out) == source["expected"] and hidden(out) == []


def test_a_planted_record_symlink_is_refused(source, tmp_path):
    out = tmp_path / "out"
    stage, shards = killed_with_two_shards(source, out)
    record = stage / staging.RECORDS_DIR / (shards[0] + ".json")
    record.unlink()
    record.symlink_to(a_source_file(source))
    resumed = convert(source, out, "--resume")
    assert resumed.returncode == 73 and str(record) in resumed.stderr and no_traceback(resumed), resumed.stderr


@pytest.mark.parametrize("what", ["staging folder", "records folder"])
def test_a_staging_or_records_folder_that_is_a_symlink_is_refused(source, tmp_path, what):
    out = tmp_path / "out"
    stage, _ = killed_with_two_shards(source, out)
    target = tmp_path / "elsewhere"
    victim = stage if what == "staging folder" else stage / staging.RECORDS_DIR
    victim.rename(target)
    victim.symlink_to(target, target_is_directory=True)
    before = snapshot(target)
    resumed = convert(source, out, "--resume")
    assert resumed.returncode == 73 and no_traceback(resumed), resumed.stderr
    assert f"{victim} is a symbolic link" in resumed.stderr and "--discard-partial" in resumed.stderr
    assert snapshot(target) == before and not out.exists()
    if what == "staging folder":      # --discard-partial removes the link itself, never what it points to
        again = convert(source, out, "--discard-partial")
        assert again.returncode == 0, again.stderr
        assert tree_bytes(out) == source["expected"] and snapshot(target) == before


def test_a_staging_folder_owned_by_another_user_is_refused(source, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to give the staging folder to another user")
    out = tmp_path / "out"
    stage, _ = killed_with_two_shards(source, out)
    os.chown(stage, 4242, 4242)
    resumed = convert(source, out, "--resume")
    assert resumed.returncode == 73 and "owned by another user (uid 4242)" in resumed.stderr, resumed.stderr
    assert str(stage) in resumed.stderr and stage.is_dir()
    plain = convert(source, out)
    assert plain.returncode == 73 and "owned by another user" in plain.stderr
    again = convert(source, out, "--discard-partial")
    assert again.returncode == 0, again.stderr
    assert tree_bytes(out) == source["expected"] and hidden(out) == []


def test_shard_files_never_follow_a_symlink(tmp_path):
    """Defence in depth under the take-over scan: a shard opened for writing replaces a symlink, and the CRC
    read-back refuses one."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    link = tmp_path / "model.safetensors"
    link.symlink_to(victim)
    sink = FileSink(str(link), 4)
    sink.write_at(0, b"new!")
    sink.close()
    assert victim.read_bytes() == b"precious" and not link.is_symlink() and link.read_bytes() == b"new!"
    other = tmp_path / "other.safetensors"
    other.symlink_to(victim)
    with pytest.raises(OutputError, match="symbolic link"):
        durable.file_crc32(str(other), streamconv.fs.fastpaths.detect())


# -- 16.8: probe files and anything else not planned -------------------------------------------------------

def test_a_kill_during_the_copy_probe_never_publishes_the_probe(source, tmp_path):
    if "copy_file_range" not in streamconv.fs.fastpaths.detect().names:
        pytest.skip("no copy_file_range here: nothing is probed")
    out = tmp_path / "out"
    killed = convert(source, out, env={failpoints.KILL_AT_ENV: "copy-probe"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    stage = tmp_path / ".out.streamconv-partial"
    left = [p.name for p in stage.rglob("*") if p.name.startswith(streamconv.fs.fastpaths.PROBE_FILE_NAME)]
    assert left, "the kill point is not inside the probe"
    resumed = convert(source, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert tree_bytes(out) == source["expected"] and hidden(out) == []


def test_a_stale_probe_file_of_an_older_version_is_removed_on_resume(source, tmp_path):
    out = tmp_path / "out"
    stage, _ = killed_with_two_shards(source, out)
    (stage / f"{streamconv.fs.fastpaths.PROBE_FILE_NAME}-123-456").write_bytes(b"x")
    resumed = convert(source, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert tree_bytes(out) == source["expected"] and hidden(out) == []


def test_a_file_that_is_not_planned_is_never_committed(source, tmp_path):
    out = tmp_path / "out"
    stage, _ = killed_with_two_shards(source, out)
    (stage / "notes.txt").write_text("someone else's")
    resumed = convert(source, out, "--resume")
    assert resumed.returncode == 73 and no_traceback(resumed), resumed.stderr
    assert f"{stage / 'notes.txt'}: not part of the planned output" in resumed.stderr
    assert "nothing was committed" in resumed.stderr and not out.exists()
    assert (stage / "notes.txt").exists()       # --resume keeps the folder for the user to look at


# -- 16.12: filesystems without flock -------------------------------------------------------------------------

def test_no_flock_falls_back_to_a_lock_file(source, tmp_path):
    if not shutil.which("strace"):
        pytest.skip("strace is not installed: cannot make flock fail with ENOLCK")
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run(
        ["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=flock", "-e", "inject=flock:error=ENOLCK",
         sys.executable, "-m", "streamconv.cli", "convert", str(source["ckpt"]), str(out),
         "--max-shard-size", SHARD, "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    notes = " ".join(json.loads(result.stdout)["notes"])
    assert "cannot flock" in notes and ".out.streamconv-lock" in notes
    assert tree_bytes(out) == source["expected"] and hidden(out) == []


@pytest.fixture
def no_flock(monkeypatch):
    import fcntl

    def flock(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", flock)


def dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.parametrize("holder,converts", [
    ("dead pid, this host", True), ("live pid, this host", False), ("another host", False), ("garbage", False)])
def test_the_lock_file_fallback(source, tmp_path, no_flock, holder, converts):
    out = tmp_path / "out"
    lock = tmp_path / ".out.streamconv-lock"
    host = socket.gethostname()
    lock.write_text({"dead pid, this host": json.dumps({"pid": dead_pid(), "host": host}),
                     "live pid, this host": json.dumps({"pid": os.getppid(), "host": host}),
                     "another host": json.dumps({"pid": os.getpid(), "host": host + "-elsewhere"}),
                     "garbage": ""}[holder])
    result = CliRunner().invoke(cli, ["convert", str(source["ckpt"]), str(out), "--max-shard-size", SHARD])
    if converts:
        assert result.exit_code == 0, result.output
        assert tree_bytes(out) == source["expected"] and hidden(out) == []
        return
    assert result.exit_code == 73, result.output
    assert str(lock) in result.stderr and "remove that file" in result.stderr
    if holder == "another host":
        assert f"on host {host}-elsewhere" in result.stderr
    # what this run created is gone; the other run's lock file stays
    assert not out.exists() and hidden(out) == [".out.streamconv-lock"]


def test_a_second_run_is_kept_out_by_the_lock_file(source, tmp_path, no_flock):
    out = tmp_path / "out"
    first = staging.StagingDir(str(out))
    try:
        assert "cannot flock" in " ".join(first.notes)
        with pytest.raises(OutputError, match="another streamconv run may be converting"):
            staging.StagingDir(str(out), resume=True)
    finally:
        first.discard()
    assert hidden(out) == []


# -- 16.21: out of descriptors on a shard ----------------------------------------------------------------

def test_emfile_on_a_shard_is_a_resource_error(source, tmp_path, monkeypatch):
    real_open = outfiles.os.open

    def open_(path, flags, *args, **kw):
        if str(path).endswith(".safetensors") and flags & os.O_CREAT:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE), path)
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(outfiles.os, "open", open_)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["convert", str(source["ckpt"]), str(out), "--max-shard-size", SHARD])
    assert result.exit_code == 71, result.output
    assert "too many open files" in result.stderr and "ulimit -n" in result.stderr and ".safetensors" in result.stderr
    assert not out.exists() and hidden(out) == []


# -- 16.4, 16.16, 16.19 and crash consistency: a kill at every step of the commit ------------------------------

OLD = {"old.txt": b"the previous output"}
NO_EXCHANGE = {streamconv.failpoints.NO_FAST_PATHS_ENV: "renameat2"}     # the two-rename fallback of --overwrite


def with_old_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_bytes(OLD["old.txt"])
    return out


def test_an_empty_output_folder_made_after_a_kill_in_the_swap_window_never_loses_the_old_output(source, tmp_path):
    out = with_old_output(tmp_path)
    killed = convert(source, out, "--overwrite-any", env=dict(NO_EXCHANGE, **{failpoints.KILL_AT_ENV: "between-swap-renames"}))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists() and tree_bytes(tmp_path / ".out.streamconv-old") == OLD
    out.mkdir()                                     # a job script's `mkdir -p "$OUT"`
    failed = convert(source, out)                   # then any run that fails
    assert failed.returncode == 73 and no_traceback(failed), failed.stderr
    assert tree_bytes(out) == OLD and not (tmp_path / ".out.streamconv-old").exists()


def test_an_old_folder_is_never_deleted_when_the_output_is_not_the_new_one(source, tmp_path):
    out = with_old_output(tmp_path)
    killed = convert(source, out, "--overwrite-any", env=dict(NO_EXCHANGE, **{failpoints.KILL_AT_ENV: "between-swap-renames"}))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    out.mkdir()
    (out / "mine.txt").write_text("made after the kill")
    again = convert(source, out, "--overwrite-any")
    assert again.returncode == 73 and no_traceback(again), again.stderr
    assert "neither was touched" in again.stderr and ".out.streamconv-old" in again.stderr
    assert tree_bytes(tmp_path / ".out.streamconv-old") == OLD and tree_bytes(out) == {"mine.txt": b"made after the kill"}


def test_a_kill_between_the_exchange_and_the_rename_to_old_is_finished_not_called_interrupted(source, tmp_path):
    out = with_old_output(tmp_path)
    killed = convert(source, out, "--overwrite-any", env={failpoints.KILL_AT_ENV: "after-exchange"})
    if killed.returncode == 0:
        pytest.skip("RENAME_EXCHANGE is not available on this filesystem")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert tree_bytes(out) == source["expected"]
    again = convert(source, out, "--json")     # a retry: the swap is finished, the output is already there
    report = json.loads(again.stdout)
    assert again.returncode == 0 and report["already_converted"], again.stderr
    assert "interrupted conversion" not in again.stdout + again.stderr
    assert any("holds the complete new output" in n for n in report["notes"]), report["notes"]
    assert tree_bytes(out) == source["expected"] and hidden(out) == []


def test_an_interrupt_right_after_the_commit_says_the_output_is_complete(source, tmp_path):
    out = tmp_path / "out"
    result = convert(source, out, "--json", env={failpoints.KILL_AT_ENV: "after-commit", failpoints.KILL_SIGNALS_ENV: "INT"})
    assert result.returncode == 130 and no_traceback(result), result.stderr
    assert "nothing was committed" not in result.stderr and f"{out} is complete and in place" in result.stderr
    assert json.loads(result.stdout)["exit_code"] == 130
    assert tree_bytes(out) == source["expected"] and hidden(out) == []


COMMON = ["files-synced", "records-removed", "before-rename", "after-rename", "parent-synced", "after-commit"]
SWAP = ["journal-written", "old-removed"]
CRASH_CASES = ([("exchange", "old", p) for p in COMMON + SWAP + ["after-exchange"]]
               + [("fallback", "old", p) for p in COMMON + SWAP + ["between-swap-renames"]]
               + [(mode, "none", p) for mode in ("exchange", "fallback") for p in COMMON])


def _crash_param(mode, previous, point):
    """The fallback's copies of the cases whose kill point sits in code both modes share run in `make test-slow`:
    every point with no previous output (only the one rename differs: renameat2 NOREPLACE or rename), and the
    points before the rename with one (nothing was moved yet; the resume's swap is the other fallback cases')."""
    slow = mode == "fallback" and (previous == "none" or point in ("files-synced", "records-removed", "before-rename"))
    return pytest.param(mode, previous, point, marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize("mode,previous,point", [_crash_param(*case) for case in CRASH_CASES])
def test_a_kill_at_every_commit_step_leaves_old_or_new_and_resumes_to_identical_bytes(source, tmp_path, mode,
                                                                                       previous, point):
    if mode == "exchange" and "renameat2" in fastpaths.disabled():
        pytest.skip("renameat2 is turned off in this run (STREAMCONV_NO_FAST_PATHS): the fallback cases cover it")
    out = with_old_output(tmp_path) if previous == "old" else tmp_path / "out"
    before = OLD if previous == "old" else None
    env = dict(NO_EXCHANGE if mode == "fallback" else {}, **{failpoints.KILL_AT_ENV: point})
    killed = convert(source, out, "--overwrite-any", env=env)
    assert killed.returncode == -signal.SIGKILL, f"{point} was never reached: {killed.stderr}"
    after = tree_bytes(out) if out.exists() else None
    if after is None and point == "between-swap-renames":
        after = tree_bytes(tmp_path / ".out.streamconv-old")    # set aside; the next run moves it back
    assert after in (before, source["expected"]), f"after a kill at {point}: {sorted(after or [])}"
    plain_env = NO_EXCHANGE if mode == "fallback" else {}
    out.mkdir(exist_ok=True)                            # a job script's `mkdir -p "$OUT"` after the kill
    look = convert(source, out, env=plain_env)          # a run that only looks: recovers, converts nothing
    assert no_traceback(look)
    now = tree_bytes(out) or None                       # (an empty folder is as good as none)
    assert now in (before, source["expected"]), f"after a kill at {point} and a rerun: {sorted(now or [])}"
    if now == source["expected"]:                       # committed: the rerun tidied up everything
        assert hidden(out) == [] and "interrupted conversion" not in look.stderr, look.stderr
    resumed = convert(source, out, "--overwrite-any", "--resume", env=plain_env)
    assert resumed.returncode == 0, resumed.stderr
    assert tree_bytes(out) == source["expected"] and hidden(out) == []


@pytest.mark.parametrize("mode", ["exchange", "fallback"])
def test_a_swap_that_fails_before_anything_moved_leaves_no_journal(source, tmp_path, monkeypatch, mode):
    out = with_old_output(tmp_path)
    if mode == "fallback":
        monkeypatch.setenv(streamconv.failpoints.NO_FAST_PATHS_ENV, "renameat2")
        real = os.rename

        def rename(src, dst):
            if str(src) == str(out):
                raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(src))
            return real(src, dst)
        monkeypatch.setattr(staging.os, "rename", rename)
    else:
        monkeypatch.delenv(streamconv.failpoints.NO_FAST_PATHS_ENV, raising=False)

        def renameat2(src, dst, flags):
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), dst)
        monkeypatch.setattr(staging, "_renameat2", renameat2)
    with pytest.raises(OutputError, match="cannot move the finished output into place"):
        streamconv.convert(str(source["ckpt"]), str(out), max_shard_size=SHARD, overwrite_any=True)
    assert tree_bytes(out) == OLD and hidden(out) == []


def test_a_run_never_tidies_the_swap_of_a_run_that_is_committing_right_now(source, tmp_path):
    out = with_old_output(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(REPO), **NO_EXCHANGE,
               **{failpoints.KILL_AT_ENV: "between-swap-renames", failpoints.KILL_SIGNALS_ENV: "STOP"})
    proc = subprocess.Popen([sys.executable, "-m", "streamconv.cli", "convert", str(source["ckpt"]), str(out),
                             "--max-shard-size", SHARD, "--overwrite-any"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        os.waitpid(proc.pid, os.WUNTRACED)      # stopped between its two renames: OUT is missing right now
        assert not out.exists()
        second = convert(source, out, env=NO_EXCHANGE)
        assert second.returncode == 73 and "another streamconv run is converting" in second.stderr, second.stderr
        assert not out.exists() and tree_bytes(tmp_path / ".out.streamconv-old") == OLD
        proc.send_signal(signal.SIGCONT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert tree_bytes(out) == source["expected"] and hidden(out) == []


def test_a_shard_owned_by_another_user_is_refused_on_resume(source, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to give a file to another user")
    out = tmp_path / "out"
    stage, shards = killed_with_two_shards(source, out)
    os.chown(stage / shards[0], 4242, 4242)
    resumed = convert(source, out, "--resume")
    assert resumed.returncode == 73 and no_traceback(resumed), resumed.stderr
    assert f"{stage / shards[0]} is owned by another user (uid 4242)" in resumed.stderr and not out.exists()
