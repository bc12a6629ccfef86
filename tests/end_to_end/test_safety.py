"""Never lose a byte (issue 7): the source is never touched, the destination changes in one step, shards are
durable, a killed run resumes to the same bytes, full disks and signals end cleanly with documented codes.

Most tests run `python -m streamconv.cli` in a subprocess against a real checkpoint written by torch's DCP
writer, and kill it at named points with the test-only hook STREAMCONV_TEST_KILL_AT (see streamconv/output/staging.py).
After every scenario, every source file's bytes and mtime are checked (the `source` fixture, tests/conftest.py).
"""
import errno
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import streamconv
from streamconv import failpoints
from streamconv.output import durable, staging
from streamconv.cli import cli
from streamconv.errors import OutputError
from tests.support.safety import REPO, SHARD, convert, hidden, no_traceback, run, snapshot, tree_bytes


# -- 1. the source is sacred -------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["itself", "parent", "symlink"])
def test_output_that_would_replace_the_checkpoint_is_refused(source, tmp_path, where):
    ckpt = source["ckpt"]
    if where == "itself":
        out = ckpt
    elif where == "parent":
        out = ckpt.parent
    else:
        out = tmp_path / "link"
        out.symlink_to(ckpt, target_is_directory=True)
    result = run("convert", ckpt, out, "--overwrite", "--json")
    assert result.returncode == 73, result.stderr
    assert "could delete the source" in result.stderr and no_traceback(result)
    assert json.loads(result.stdout)["exit_code"] == 73
    assert not [p for p in out.parent.iterdir() if "streamconv" in p.name]


def test_output_holding_a_symlinked_source_file_is_refused(source, tmp_path):
    """A checkpoint whose rank file is a symlink into another folder: that folder may not be the output."""
    ckpt, store = tmp_path / "ckpt", tmp_path / "store"
    shutil.copytree(source["ckpt"], ckpt)
    store.mkdir()
    (ckpt / "__0_0.distcp").rename(store / "__0_0.distcp")
    (ckpt / "__0_0.distcp").symlink_to(store / "__0_0.distcp")
    before = snapshot(store)
    result = run("convert", ckpt, store, "--overwrite")
    assert result.returncode == 73 and "would hold the source file" in result.stderr, result.stderr
    assert snapshot(store) == before


def test_output_holding_the_config_folders_linked_files_is_refused(source, tmp_path):
    """A hub snapshot: config.json is a symlink into blobs/. Converting into blobs/ would delete it."""
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshot"
    blobs.mkdir()
    snap.mkdir()
    (blobs / "4f2a").write_text('{"model_type": "llama", "tie_word_embeddings": false}')
    (snap / "config.json").symlink_to("../blobs/4f2a")
    # --allow-unmatched: the stand-in config.json is no model of TinyLlama's (tests/hf/test_expected.py checks that)
    result = run("convert", source["ckpt"], blobs, "--config-from", snap, "--overwrite", "--allow-unmatched")
    assert result.returncode == 73 and "would hold the source file" in result.stderr, result.stderr
    assert [p.name for p in blobs.iterdir()] == ["4f2a"]


def test_output_inside_the_checkpoint_folder_is_fine(source, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(source["ckpt"], ckpt)
    before = snapshot(ckpt)
    for extra in ((), ("--overwrite",)):      # and again over the first output
        result = run("convert", ckpt, ckpt / "hf", "--max-shard-size", SHARD, *extra)
        assert result.returncode == 0, result.stderr
    assert tree_bytes(ckpt / "hf") == source["expected"]
    assert {k: v for k, v in snapshot(ckpt).items() if not k.startswith("hf/")} == before


# -- 2. atomic commit ----------------------------------------------------------------------------------------

def test_a_destination_filled_during_the_run_is_not_replaced(source, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    real = staging.kill_point

    def someone_writes(name):
        if name == "before-rename":
            (out / "theirs.txt").write_text("precious")
        real(name)

    monkeypatch.setattr(staging, "kill_point", someone_writes)
    with pytest.raises(OutputError, match="written there during the conversion"):
        streamconv.convert(str(source["ckpt"]), str(out), max_shard_size=SHARD)
    assert [p.name for p in out.iterdir()] == ["theirs.txt"] and (out / "theirs.txt").read_text() == "precious"
    assert hidden(out) == []


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_overwrite_replaces_the_old_output_in_one_step(source, tmp_path, exchange):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    env = {} if exchange else {failpoints.NO_FAST_PATHS_ENV: "renameat2"}
    result = convert(source, out, "--overwrite-any", env=env)
    assert result.returncode == 0, result.stderr
    assert tree_bytes(out) == source["expected"] and hidden(out) == []


def test_overwrite_fallback_puts_the_old_output_back_when_the_swap_fails(source, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    monkeypatch.setenv(failpoints.NO_FAST_PATHS_ENV, "renameat2")
    real_rename = os.rename

    def failing_rename(src, dst):
        if str(src).endswith(staging.STAGING_SUFFIX) and str(dst) == str(out):
            raise OSError(errno.EIO, "Input/output error")
        return real_rename(src, dst)

    monkeypatch.setattr(staging.os, "rename", failing_rename)
    with pytest.raises(OutputError, match="cannot move the finished output into place"):
        streamconv.convert(str(source["ckpt"]), str(out), max_shard_size=SHARD, overwrite_any=True)
    assert tree_bytes(out) == {"old.txt": b"old"} and hidden(out) == []


def test_kill_between_the_two_fallback_renames_keeps_the_old_output(source, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    killed = convert(source, out, "--overwrite-any",
                     env={failpoints.NO_FAST_PATHS_ENV: "renameat2", failpoints.KILL_AT_ENV: "between-swap-renames"})
    assert killed.returncode == -signal.SIGKILL
    assert not out.exists() and (tmp_path / ".out.streamconv-old" / "old.txt").read_text() == "old"
    # The next run puts the old output back first (and, without --overwrite, stops there).
    again = convert(source, out)
    assert again.returncode == 73 and "not empty" in again.stderr and tree_bytes(out) == {"old.txt": b"old"}
    resumed = convert(source, out, "--overwrite-any", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert tree_bytes(out) == source["expected"] and hidden(out) == []


# -- 3. durability ----------------------------------------------------------------------------------------------

def test_every_file_and_folder_is_fsynced_before_and_after_the_rename(source, tmp_path, monkeypatch):
    monkeypatch.delenv(failpoints.NO_FAST_PATHS_ENV, raising=False)     # watches renameat2 (the plain path: test_fastpaths.py)
    events = []
    real_fsync, real_rename2, real_write = os.fsync, staging._renameat2, durable.write_json_atomic

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def renameat2(src, dst, flags):
        events.append(("rename", dst))
        return real_rename2(src, dst, flags)

    def record(path, obj):
        events.append(("record", os.path.basename(path)))
        return real_write(path, obj)

    monkeypatch.setattr(staging.os, "fsync", fsync)
    monkeypatch.setattr(staging, "_renameat2", renameat2)
    monkeypatch.setattr(durable, "write_json_atomic", record)
    out = tmp_path / "out"
    streamconv.convert(str(source["ckpt"]), str(out), max_shard_size=SHARD, workers=1)
    stage = str(tmp_path / ".out.streamconv-partial")
    synced = [e[1] for e in events if e[0] == "fsync"]
    rename_at = events.index(("rename", str(out)))
    shards = [n for n in source["expected"] if n.endswith(".safetensors")]
    for name in shards:   # each shard fsynced before its resume record
        assert events.index(("fsync", f"{stage}/{name}")) < events.index(("record", name + ".json")) < rename_at
    assert events.index(("fsync", f"{stage}/model.safetensors.index.json")) < rename_at
    assert events.index(("fsync", f"{stage}/streamconv.json")) < rename_at   # the output's record
    assert events.index(("fsync", stage)) < rename_at                       # the folder's entries
    assert events.index(("fsync", str(tmp_path))) > rename_at               # the rename itself
    assert len(synced) == len(shards) + 4


# -- 4. resume after a kill ----------------------------------------------------------------------------------

KILL_POINTS = ["before-first-shard", "mid-shard", "between-shards@2", "index", "before-rename"]


@pytest.mark.parametrize("point", KILL_POINTS)
def test_killed_conversion_resumes_to_identical_bytes(source, tmp_path, point):
    out = tmp_path / "out"
    killed = convert(source, out, "--workers", "1", env={failpoints.KILL_AT_ENV: point})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists() and hidden(out) == [".out.streamconv-partial"]
    stage = tmp_path / ".out.streamconv-partial"
    kept_before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in stage.glob("*.safetensors")
                   if (stage / staging.RECORDS_DIR / (p.name + ".json")).exists()}

    plain = convert(source, out)
    assert plain.returncode == 73 and no_traceback(plain)
    assert "interrupted conversion" in plain.stderr and "--resume" in plain.stderr and "--discard-partial" in plain.stderr

    resumed = convert(source, out, "--resume", "--json")
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads(resumed.stdout)
    assert tree_bytes(out) == source["expected"] and hidden(out) == []
    if point == "between-shards@2":
        assert len(kept_before) == 2 and "kept 2 of" in " ".join(report["notes"])
    if point == "before-rename":
        assert len(kept_before) == 0      # records go just before the rename: the shards are redone
    for name, identity in kept_before.items():   # kept shards were not rewritten
        assert ((out / name).stat().st_ino, (out / name).stat().st_mtime_ns) == identity


def test_kill_right_after_the_rename_leaves_the_finished_output(source, tmp_path):
    out = tmp_path / "out"
    killed = convert(source, out, env={failpoints.KILL_AT_ENV: "after-rename"})
    assert killed.returncode == -signal.SIGKILL
    assert tree_bytes(out) == source["expected"] and hidden(out) == []


def test_resume_rewrites_a_damaged_shard_and_refuses_a_changed_plan(source, tmp_path):
    out = tmp_path / "out"
    assert convert(source, out, "--workers", "1", env={failpoints.KILL_AT_ENV: "between-shards@3"}).returncode == -9
    stage = tmp_path / ".out.streamconv-partial"
    first = sorted(stage.glob("*.safetensors"))[0]
    data = bytearray(first.read_bytes())
    data[-1] ^= 0xFF                                    # same size, wrong checksum
    first.write_bytes(bytes(data))

    other = convert(source, out, "--resume", "--dtype", "float16")
    assert other.returncode == 73 and "other options" in other.stderr and "--dtype" in other.stderr
    assert stage.is_dir()

    resumed = run("convert", source["ckpt"], out, "--max-shard-size", SHARD, "--resume", "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert "kept 2 of" in " ".join(json.loads(resumed.stdout)["notes"])
    assert tree_bytes(out) == source["expected"]


def test_resume_refuses_a_changed_checkpoint_and_discard_partial_starts_over(source, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(source["ckpt"], ckpt)
    out = tmp_path / "out"
    args = ("convert", ckpt, out, "--max-shard-size", SHARD)
    assert run(*args, env={failpoints.KILL_AT_ENV: "between-shards"}).returncode == -9
    os.utime(ckpt / "__1_0.distcp", ns=(1, 1))
    changed = run(*args, "--resume")
    assert changed.returncode == 73 and "checkpoint changed" in changed.stderr and "__1_0.distcp" in changed.stderr
    fresh = run(*args, "--discard-partial")
    assert fresh.returncode == 0, fresh.stderr
    assert tree_bytes(out) == source["expected"] and hidden(out) == []


# -- 7. full disks and IO errors -------------------------------------------------------------------------------

def _file_size_limit(nbytes):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)     # get EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return apply


@pytest.mark.parametrize("resume", [False, True])
def test_file_size_limit_is_a_clear_error(source, tmp_path, resume):
    out = tmp_path / "out"
    extra = ("--resume",) if resume else ()
    result = convert(source, out, "--max-shard-size", "400KB", *extra, "--json",
                     preexec_fn=_file_size_limit(150_000))
    assert result.returncode == 73, result.stderr
    assert no_traceback(result) and "File too large" in result.stderr and "bytes free on" in result.stderr
    assert ".safetensors" in result.stderr
    assert json.loads(result.stdout)["exit_code"] == 73
    assert not out.exists()
    assert hidden(out) == ([".out.streamconv-partial"] if resume else [])


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 2 MiB tmpfs (needs root; skipped where mounting is not allowed)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def _fill(folder: Path, leave_bytes: int) -> None:
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    with open(folder / "filler", "wb") as f:
        try:
            f.write(b"\0" * max(0, free - leave_bytes))
            f.flush()
        except OSError:
            pass


@pytest.mark.parametrize("point", ["before-first-shard", "last-shard-done"])
def test_disk_that_fills_up_during_the_run(source, small_tmpfs, point):
    """The preflight passes; then another process fills the disk (the run is stopped meanwhile)."""
    shards = len([n for n in source["expected"] if n.endswith(".safetensors")])
    hook = f"between-shards@{shards}" if point == "last-shard-done" else point
    out = small_tmpfs / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO), **{failpoints.KILL_AT_ENV: hook, failpoints.KILL_SIGNALS_ENV: "STOP"})
    proc = subprocess.Popen([sys.executable, "-m", "streamconv.cli", "convert", str(source["ckpt"]), str(out),
                             "--max-shard-size", SHARD, "--json"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        os.waitpid(proc.pid, os.WUNTRACED)
        _fill(small_tmpfs, 40_000 if point == "before-first-shard" else 0)
        proc.send_signal(signal.SIGCONT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 73, stderr
    assert "Traceback" not in stderr and "No space left on device" in stderr and "bytes free on" in stderr
    if point == "before-first-shard":
        # (two workers: whichever shard meets the full disk first is named)
        assert re.search(r"model-\d{5}-of-\d{5}\.safetensors: (write|copy) failed at offset", stderr), stderr
    else:
        assert "model.safetensors.index.json" in stderr
    assert json.loads(stdout)["exit_code"] == 73
    assert sorted(p.name for p in small_tmpfs.iterdir()) == ["filler"]     # staging removed


def test_disk_full_while_writing_the_index_names_the_file(source, tmp_path, monkeypatch):
    real_write = os.write

    def full(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("index.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(staging.os, "write", full)
    result = CliRunner().invoke(cli, ["convert", str(source["ckpt"]), str(tmp_path / "out"),
                                      "--max-shard-size", SHARD])
    assert result.exit_code == 73, result.output
    assert "model.safetensors.index.json" in result.output and "No space left" in result.output
    assert "bytes free on" in result.output and list(tmp_path.iterdir()) == []


def test_free_space_preflight_counts_the_index(source):
    from streamconv.output import destination
    plan = streamconv.plan(str(source["ckpt"]), max_shard_size=SHARD)
    index_bytes = len(json.dumps(plan.index(), indent=2))
    assert destination.output_nbytes(plan, None, ()) >= plan.files_nbytes + index_bytes


@pytest.mark.parametrize("call", ["preadv", "pread"])
def test_a_read_error_names_the_file_and_offset(source, tmp_path, monkeypatch, call):
    """preadv with the fast paths on; pread, the plain path, with them off."""
    from streamconv.source import io as sio
    if call == "pread":
        monkeypatch.setenv(failpoints.NO_FAST_PATHS_ENV, "1")
    else:
        monkeypatch.delenv(failpoints.NO_FAST_PATHS_ENV, raising=False)
    real = getattr(sio.os, call)

    def eio(fd, *args):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("__1_0.distcp"):
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, *args)

    monkeypatch.setattr(sio.os, call, eio)
    result = CliRunner().invoke(cli, ["convert", str(source["ckpt"]), str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "__1_0.distcp" in result.output and "offset" in result.output and "Input/output error" in result.output


def test_an_unexpected_exception_is_one_line_asking_for_a_report(source, tmp_path, monkeypatch):
    from streamconv import api

    def broken(*a, **k):
        raise TypeError("boom")

    monkeypatch.setattr(api, "convert", broken)
    result = CliRunner().invoke(cli, ["convert", str(source["ckpt"]), str(tmp_path / "out"), "--json"])
    assert result.exit_code == 1
    assert "Traceback" not in result.output and "report" in result.stderr and len(result.stderr.splitlines()) == 1
    assert json.loads(result.stdout) == {"error": result.stderr.strip(), "kind": "InternalError", "exit_code": 1}


# -- 8. signals and exit codes ----------------------------------------------------------------------------------

@pytest.mark.parametrize("point,signals", [
    ("mid-shard", "INT,TERM"), ("between-shards@2", "HUP"),
    ("index", "TERM,INT"), ("before-rename", "INT,HUP,TERM"), ("before-first-shard", "TERM,TERM,INT"),
])
def test_any_mix_of_signals_exits_130_cleanly(source, tmp_path, point, signals):
    out = tmp_path / "out"
    result = convert(source, out, "--json", env={failpoints.KILL_AT_ENV: point, failpoints.KILL_SIGNALS_ENV: signals})
    assert result.returncode == 130, result.stderr
    assert no_traceback(result) and "interrupted" in result.stderr
    assert json.loads(result.stdout)["exit_code"] == 130
    assert not out.exists() and hidden(out) == []


def test_signals_during_the_rename_are_held_and_the_run_commits(source, tmp_path):
    out = tmp_path / "out"
    result = convert(source, out, env={failpoints.KILL_AT_ENV: "after-rename", failpoints.KILL_SIGNALS_ENV: "INT,TERM,HUP"})
    assert result.returncode == 0, result.stderr
    assert tree_bytes(out) == source["expected"] and hidden(out) == []


def test_a_second_run_into_the_same_output_is_refused(source, tmp_path):
    import fcntl
    out = tmp_path / "out"
    stage = tmp_path / ".out.streamconv-partial"
    stage.mkdir()
    fd = os.open(stage, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)      # as a running conversion holds it
        result = convert(source, out, "--resume")
    finally:
        os.close(fd)
    assert result.returncode == 73 and "another streamconv run" in result.stderr, result.stderr
    assert stage.is_dir() and not out.exists()


def test_signals_from_outside_while_stopped_mid_run(source, tmp_path):
    """The run stops itself mid-shard; the test sends SIGINT, SIGTERM and SIGHUP, then lets it continue."""
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO), **{failpoints.KILL_AT_ENV: "mid-shard", failpoints.KILL_SIGNALS_ENV: "STOP"})
    proc = subprocess.Popen([sys.executable, "-m", "streamconv.cli", "convert", str(source["ckpt"]), str(out),
                             "--max-shard-size", SHARD], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        os.waitpid(proc.pid, os.WUNTRACED)          # stopped at the hook
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            proc.send_signal(sig)
        proc.send_signal(signal.SIGCONT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    assert not out.exists() and hidden(out) == []


@pytest.mark.parametrize("spacing_s", [0, 0.0005, 0.002])
def test_a_storm_of_signals_still_exits_130(source, tmp_path, spacing_s):
    """SIGINT, then SIGTERM/SIGHUP/SIGINT over and over until the process is gone (a scheduler that insists):
    130 every time, never 'killed by signal', never a traceback, nothing left behind."""
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO), **{failpoints.KILL_AT_ENV: "mid-shard", failpoints.KILL_SIGNALS_ENV: "STOP"})
    proc = subprocess.Popen([sys.executable, "-m", "streamconv.cli", "convert", str(source["ckpt"]), str(out),
                             "--max-shard-size", SHARD], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    os.waitpid(proc.pid, os.WUNTRACED)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGCONT)
    storm = [signal.SIGTERM, signal.SIGHUP, signal.SIGINT]
    for k in range(2000):
        if proc.poll() is not None:
            break
        try:
            proc.send_signal(storm[k % 3])
        except ProcessLookupError:
            break
        time.sleep(spacing_s)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert not out.exists() and hidden(out) == []


@pytest.mark.parametrize("args", [
    ["convert"], ["convert", "a", "b", "--no-such-option"], ["convert", "a", "b", "--workers", "0"], ["frobnicate"],
])
def test_usage_errors_exit_64_and_json_reports_them(args):
    plain = run(*args)
    assert plain.returncode == 64 and no_traceback(plain) and "Usage" in plain.stderr
    as_json = run(*args, "--json")
    assert as_json.returncode == 64
    report = json.loads(as_json.stdout)
    assert report["exit_code"] == 64 and report["error"]


def test_json_success_carries_exit_code_0(source, tmp_path):
    result = convert(source, tmp_path / "out", "--json")
    assert result.returncode == 0
    report = json.loads(result.stdout)
    assert report["exit_code"] == 0 and report["error"] is None


# -- the shard checksum in the resume records ---------------------------------------------------------------

def test_crc32_combine_matches_zlib():
    import random
    import zlib

    from streamconv.output import crc
    rng = random.Random(0)
    for _ in range(50):
        a, b = rng.randbytes(rng.randrange(0, 3000)), rng.randbytes(rng.randrange(0, 3000))
        want = zlib.crc32(a + b)
        assert crc.crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == want
        assert (crc._combine_python(zlib.crc32(a), zlib.crc32(b), len(b)) if b else zlib.crc32(a)) == want


@pytest.mark.parametrize("layout,extra", [("tp", ()), ("tp", ("--dtype", "float16")), ("tp", ("--workers", "1"))])
def test_recorded_checksums_are_the_files_crc32(source, tmp_path, layout, extra):
    """The record's CRC is combined from the zip directory's CRCs and the bytes written (no read-back): it must
    equal the file's own CRC-32, on the copy path, the cast path and the block-assembly path."""
    import zlib
    out = tmp_path / "out"
    shards = len([n for n in source["expected"] if n.endswith(".safetensors")])
    killed = convert(source, out, *extra, env={failpoints.KILL_AT_ENV: "index"})
    assert killed.returncode == -9
    stage = tmp_path / ".out.streamconv-partial"
    records = sorted((stage / staging.RECORDS_DIR).glob("*.safetensors.json"))
    assert len(records) >= (shards if not extra else 1)
    for record in records:
        shard = stage / record.name[:-len(".json")]
        assert json.loads(record.read_text())["crc32"] == zlib.crc32(shard.read_bytes()), shard.name
