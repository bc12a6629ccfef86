"""Where the output goes (issue 16 items 1, 2, 10, 11, 21; issue 17 item 6): empty paths, identities instead
of path strings (bind mounts, hard links), the current folder, mount points, inodes, paths of the wrong kind,
a pre-created output folder's mode and owner.

CLI runs are subprocesses against the real tensor-parallel checkpoint of the data-safety suites (the `source`
fixture, tests/conftest.py, checks after every test that the checkpoint's bytes and mtimes are unchanged). Every
test that mounts does so inside `unshare --mount --propagation private`, so nothing outlives the test even if it
dies.
"""
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import streamconv
from streamconv.fs import paths
from streamconv.errors import CheckpointError, OptionsError
from tests.support.safety import REPO, SHARD, convert, no_traceback, run, snapshot

needs_mounts = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                                  reason="bind mounts need root and unshare(1) for a private mount namespace")


def in_private_namespace(script: str, timeout: int = 180) -> subprocess.CompletedProcess:
    """Run a shell script in its own mount namespace: its mounts vanish with it, whatever happens."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, env=env, timeout=timeout)


def streamconv_cmd(*args) -> str:
    return " ".join(shlex.quote(str(a)) for a in (sys.executable, "-m", "streamconv.cli", *args))


def private_copy(source, where: Path) -> Path:
    shutil.copytree(source["ckpt"], where)
    return where


# -- 1. empty paths --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("blank", ["", "   "])
def test_empty_output_path_is_a_usage_error_and_the_working_folder_survives(source, tmp_path, blank):
    work = tmp_path / "project"
    work.mkdir()
    (work / "notes.txt").write_text("precious")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "streamconv.cli", "convert", str(source["ckpt"]), blank,
                             "--overwrite", "--json"], cwd=work, capture_output=True, text=True, env=env)
    assert result.returncode == 64, result.stderr
    assert "OUTPUT_DIR" in result.stderr and "empty" in result.stderr and no_traceback(result)
    assert json.loads(result.stdout)["exit_code"] == 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project"]
    assert [p.name for p in work.iterdir()] == ["notes.txt"] and (work / "notes.txt").read_text() == "precious"


@pytest.mark.parametrize("args", [
    ["convert", "", "OUT"], ["convert", " ", "OUT"], ["plan", ""], ["inspect", "\t"], ["verify", "", "OUT"],
    ["verify", "CKPT", ""], ["convert", "CKPT", "OUT", "--config-from", ""], ["plan", "CKPT", "--config-from", " "],
    ["batch", "CKPT", "-o", ""], ["batch", "CKPT", "-o", "  "], ["batch", "", "-o", "x/{name}"],
    ["batch", "-o", "x/{name}", "--from-file", ""],
])
def test_every_empty_path_argument_is_a_usage_error(source, tmp_path, args):
    args = [str(source["ckpt"]) if a == "CKPT" else str(tmp_path / "out") if a == "OUT" else a for a in args]
    result = run(*args)
    assert result.returncode == 64, (args, result.stderr)
    assert "empty" in result.stderr and no_traceback(result)
    assert list(tmp_path.iterdir()) == []


def test_empty_paths_raise_options_error_in_the_python_api(source, tmp_path):
    ckpt = str(source["ckpt"])
    for call in (lambda: streamconv.convert(ckpt, ""), lambda: streamconv.convert("", str(tmp_path / "o")),
                 lambda: streamconv.convert(ckpt, "  ", overwrite=True), lambda: streamconv.plan(" "),
                 lambda: streamconv.inspect(""), lambda: streamconv.verify(ckpt, ""),
                 lambda: streamconv.convert(ckpt, str(tmp_path / "o"), config_from=""),
                 lambda: streamconv.convert_many([ckpt], "")):
        with pytest.raises(OptionsError, match="empty"):
            call()
    with pytest.raises(OptionsError, match="empty"):
        paths.user_path(b"  ", "x")
    assert list(tmp_path.iterdir()) == []


# -- 2. identities, not path strings ----------------------------------------------------------------------------

@needs_mounts
def test_one_folder_mounted_at_two_paths_is_recognised_as_the_source(source, tmp_path):
    """docker run -v /data:/data -v /data:/workspace; convert /workspace/ckpt /data/ckpt --overwrite."""
    data, workspace = tmp_path / "data", tmp_path / "workspace"
    private_copy(source, data / "ckpt")
    workspace.mkdir()
    before = snapshot(data / "ckpt")
    for out in (data / "ckpt", data):
        result = in_private_namespace(
            f"mount --bind {data} {workspace} && "
            + streamconv_cmd("convert", workspace / "ckpt", out, "--overwrite", "--max-shard-size", SHARD))
        assert result.returncode == 73, result.stderr
        assert "could delete the source" in result.stderr and no_traceback(result)
        assert snapshot(data / "ckpt") == before
    assert not [p for p in data.iterdir() if "streamconv" in p.name]


@needs_mounts
def test_checkpoint_bind_mounted_inside_the_old_output_is_not_emptied(source, tmp_path):
    ckpt, out = private_copy(source, tmp_path / "ckpt"), tmp_path / "out"
    (out / "mnt").mkdir(parents=True)
    (out / "old.safetensors").write_bytes(b"old")
    before = snapshot(ckpt)
    result = in_private_namespace(
        f"mount --bind {ckpt} {out / 'mnt'} && "
        + streamconv_cmd("convert", ckpt, out, "--overwrite", "--max-shard-size", SHARD))
    assert result.returncode == 73, result.stderr
    assert "bind mount" in result.stderr and no_traceback(result)
    assert snapshot(ckpt) == before and (out / "old.safetensors").read_bytes() == b"old"


def test_a_hard_linked_source_file_in_the_old_output_is_refused(source, tmp_path):
    ckpt, out = private_copy(source, tmp_path / "ckpt"), tmp_path / "out"
    out.mkdir()
    os.link(ckpt / "__0_0.distcp", out / "__0_0.distcp")
    result = run("convert", ckpt, out, "--overwrite")
    assert result.returncode == 73 and "hard link" in result.stderr, result.stderr
    assert (out / "__0_0.distcp").exists()


@needs_mounts
def test_deletion_spares_a_mount_that_appeared_after_the_check(source, tmp_path):
    """The second line of defence: a bind mount of the checkpoint inside the old output that the early check
    did not see (here: the check switched off, as if the mount appeared after it) is left alone by the deletion
    of the swapped-out old output, and the run says what it left."""
    ckpt, out = private_copy(source, tmp_path / "ckpt"), tmp_path / "out"
    (out / "mnt").mkdir(parents=True)
    (out / "old.safetensors").write_bytes(b"old")
    before = snapshot(ckpt)
    script = ("import json, sys, streamconv; from streamconv.output import destination\n"
              "destination._walk_for_sources = lambda *a: None\n"
              "r = streamconv.convert(sys.argv[1], sys.argv[2], overwrite_any=True, max_shard_size='100KB')\n"
              "print(json.dumps(r.notes))")
    result = in_private_namespace(f"mount --bind {ckpt} {out / 'mnt'} && "
                                  f"{shlex.quote(sys.executable)} -c {shlex.quote(script)} {ckpt} {out}")
    assert result.returncode == 0, result.stderr
    assert snapshot(ckpt) == before
    notes = json.loads(result.stdout)
    assert any("could not be deleted entirely" in n and "mnt" in n for n in notes), notes
    assert len([p for p in out.iterdir() if p.suffix == ".safetensors"]) >= 4


@needs_mounts
def test_remove_tree_spares_mounts_symlink_targets_and_protected_identities(tmp_path):
    """The one deletion routine: deletes what is ours, reports what it left, and never crosses into a mount
    (another filesystem or a bind mount of the same one), follows a symlink, or deletes a protected identity."""
    outside, tree = tmp_path / "outside", tmp_path / "tree"
    outside.mkdir()
    (outside / "keep").write_text("keep")
    (tree / "sub" / "deep").mkdir(parents=True)
    (tree / "sub" / "deep" / "f").write_text("x")
    (tree / "bind").mkdir()
    (tree / "tmpfs").mkdir()
    (tree / "link").symlink_to(outside, target_is_directory=True)
    (tree / "guarded").mkdir()
    (tree / "guarded" / "g").write_text("g")
    script = (f"import json, os; from streamconv.fs import paths; "
              f"p = paths.identity({str(tree / 'guarded')!r}); "
              f"print(json.dumps(paths.remove_tree({str(tree)!r}, {{p}})))")
    result = in_private_namespace(
        f"mount --bind {outside} {tree / 'bind'} && mount -t tmpfs tmpfs {tree / 'tmpfs'} && "
        f"echo t > {tree / 'tmpfs' / 'on-tmpfs'} && {shlex.quote(sys.executable)} -c {shlex.quote(script)}")
    assert result.returncode == 0, result.stderr
    left = json.loads(result.stdout)
    assert len(left) == 3, left
    assert any("bind" in x and "mount point" in x for x in left)
    assert any("tmpfs" in x and "mount point" in x for x in left)
    assert any("guarded" in x and "not deleted" in x for x in left)
    assert (outside / "keep").read_text() == "keep"             # not through the symlink, not through the mount
    assert (tree / "guarded" / "g").read_text() == "g"
    assert not (tree / "sub").exists() and not (tree / "link").exists()


# -- 3. the current folder --------------------------------------------------------------------------------------

@pytest.mark.parametrize("out, extra", [(".", ()), (".", ("--overwrite",)), ("..", ("--overwrite",))])
def test_output_that_is_the_current_folder_or_holds_it_is_refused(source, tmp_path, out, extra):
    work = tmp_path / "work"
    work.mkdir()
    if extra:
        (work / "notes.txt").write_text("precious")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "streamconv.cli", "convert", str(source["ckpt"]), out,
                             "--max-shard-size", SHARD, *extra], cwd=work, capture_output=True, text=True, env=env)
    assert result.returncode == 73, result.stderr
    assert "current folder" in result.stderr and "new folder" in result.stderr and no_traceback(result)
    assert sorted(p.name for p in work.iterdir()) == (["notes.txt"] if extra else [])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]


# -- 4. a mount point as the output --------------------------------------------------------------------------

@needs_mounts
@pytest.mark.parametrize("kind", ["tmpfs", "bind"])
def test_output_that_is_a_mount_point_is_refused_before_writing(source, tmp_path, kind):
    out, volume = tmp_path / "out", tmp_path / "volume"
    out.mkdir()
    volume.mkdir()
    mount = f"mount -t tmpfs tmpfs {out}" if kind == "tmpfs" else f"mount --bind {volume} {out}"
    result = in_private_namespace(
        f"{mount} && " + streamconv_cmd("convert", source["ckpt"], out, "--max-shard-size", SHARD)
        + f"; rc=$?; ls -A {out}; exit $rc")
    assert result.returncode == 73, result.stderr
    assert "mount point" in result.stderr and str(out / "model") in result.stderr and no_traceback(result)
    assert result.stdout.strip() == ""                       # nothing inside the mount
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "volume"]   # nothing on the parent filesystem


# -- 5. inodes, an unwritable parent, a pre-created folder --------------------------------------------------

@needs_mounts
@pytest.mark.parametrize("inodes", [8, 1])     # 8: the preflight refuses; 1: none left even for the staging folder
def test_no_free_inodes_is_named_as_such_before_writing(source, tmp_path, inodes):
    fs = tmp_path / "fs"
    fs.mkdir()
    result = in_private_namespace(
        f"mount -t tmpfs -o size=64m,nr_inodes={inodes} tmpfs {fs} && "
        + streamconv_cmd("convert", source["ckpt"], fs / "out", "--max-shard-size", SHARD)
        + f"; rc=$?; ls -A {fs}; exit $rc")
    assert result.returncode == 73, result.stderr
    # (the test's own folder name holds "inodes": the words are checked with their spaces)
    if inodes == 1:
        assert "cannot create staging folder" in result.stderr and "no free inodes" in result.stderr, result.stderr
    else:
        assert "free inodes" in result.stderr and "files and folders" in result.stderr, result.stderr
        assert "cannot create" not in result.stderr   # refused before writing
    assert no_traceback(result)
    assert result.stdout.strip() == ""


@needs_mounts
def test_enospc_with_bytes_free_blames_inodes(tmp_path):
    fs = tmp_path / "fs"
    fs.mkdir()
    script = ("import errno, os, sys; from streamconv.output import staging; d = sys.argv[1]; n = 0\n"
              "try:\n"
              "    while True: open(os.path.join(d, str(n)), 'w').close(); n += 1\n"
              "except OSError as e: assert e.errno == errno.ENOSPC\n"
              "print(staging.write_failed(os.path.join(d, 'model.safetensors'), OSError(errno.ENOSPC, 'No space')))")
    result = in_private_namespace(f"mount -t tmpfs -o size=64m,nr_inodes=16 tmpfs {fs} && "
                                  f"{shlex.quote(sys.executable)} -c {shlex.quote(script)} {fs}")
    assert result.returncode == 0, result.stderr
    assert "no free inodes" in result.stdout and "bytes are free" in result.stdout, result.stdout


def test_a_parent_the_user_cannot_write_gets_a_hint(source, tmp_path):
    """The output folder is the user's, its parent is not: root without its permission-bypassing capabilities
    (setpriv) stands in for the user, since a real other user could not run this test's interpreter."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv(1) to run without CAP_DAC_OVERRIDE")
    parent = tmp_path / "shared"
    (parent / "mine").mkdir(parents=True)
    os.chown(parent, 65534, 65534)          # someone else's folder, mode 0755: root without DAC caps cannot write
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", sys.executable,
                             "-m", "streamconv.cli", "convert", str(source["ckpt"]), str(parent / "mine")],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 73, result.stderr
    assert "staging folder is created beside the output" in result.stderr and str(parent) in result.stderr
    assert no_traceback(result)
    assert list((parent / "mine").iterdir()) == [] and sorted(p.name for p in parent.iterdir()) == ["mine"]


def test_a_pre_created_output_folder_keeps_its_mode_and_owner(source, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    os.chmod(out, 0o2750)
    if os.geteuid() == 0:
        os.chown(out, 1234, 4321)
    expected = os.stat(out)
    result = convert(source, out)
    assert result.returncode == 0, result.stderr
    now = os.stat(out)
    assert stat.S_IMODE(now.st_mode) == stat.S_IMODE(expected.st_mode)
    assert (now.st_uid, now.st_gid) == (expected.st_uid, expected.st_gid)
    assert now.st_ino != expected.st_ino            # it is the new folder, renamed into place
    assert len([p for p in out.iterdir() if p.suffix == ".safetensors"]) >= 4


# -- 6. paths of the wrong kind ----------------------------------------------------------------------------------

@pytest.mark.parametrize("verb", ["convert", "plan", "inspect", "verify", "batch"])
def test_a_checkpoint_argument_that_is_a_file_says_what_to_pass(source, tmp_path, verb):
    data_file = source["ckpt"] / "__0_0.distcp"
    args = {"convert": [data_file, tmp_path / "out"], "plan": [data_file], "inspect": [data_file],
            "verify": [data_file, tmp_path / "out"], "batch": [data_file, "-o", str(tmp_path / "{name}-hf"), "--json"]}
    result = run(verb, *args[verb])
    assert "is a file, not a folder" in result.stderr and ".metadata" in result.stderr, result.stderr
    if verb == "batch":     # one checkpoint failed: the batch exits 1, the item carries the checkpoint's code
        assert result.returncode == 1 and json.loads(result.stdout)["checkpoints"][0]["exit_code"] == 2
    else:
        assert result.returncode == CheckpointError.exit_code == 2
    assert no_traceback(result) and list(tmp_path.iterdir()) == []


def test_an_output_path_that_is_a_file_is_73_for_convert_and_3_for_verify(source, tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"not a folder")
    for extra in ((), ("--overwrite",)):
        result = convert(source, target, *extra)
        assert result.returncode == 73 and "is a file, not a folder" in result.stderr, result.stderr
    result = run("verify", source["ckpt"], target)
    assert result.returncode == 3 and "is a file, not an output folder" in result.stderr, result.stderr
    assert target.read_bytes() == b"not a folder" and sorted(p.name for p in tmp_path.iterdir()) == [target.name]
