"""Provenance (issue 16 items 5, 6, 7, 18; issue 17 items 7, 9): every output is tied to the checkpoint that made
it by its record (streamconv.json). Real checkpoints: the demo FSDP2 checkpoint saved twice by torch with
different seeds, so two saves of one architecture with the same file sizes and `.metadata` layout."""
import json
import os
import shutil
import zlib
from pathlib import Path

import pytest

import streamconv
from streamconv import failpoints
from streamconv import api
from streamconv.verification import provenance
from streamconv.output import record, staging
from streamconv.runs import runners, shardjob
from streamconv.demo_checkpoint import write_demo_checkpoint
from streamconv.errors import CheckpointError
from tests.support import safety

SHARD = "200KB"


def run(*args, env=None, timeout=180):
    """The CLI as the safety suites run it: in a process of its own when killed, else in this one."""
    return safety.run(*args, env=env, timeout=timeout)


def no_traceback(result):
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    return True


@pytest.fixture(scope="module")
def saves(demo_checkpoint, tmp_path_factory):
    """(first save, second save): the demo checkpoint and a re-save of the same model trained from another seed."""
    other = write_demo_checkpoint(tmp_path_factory.mktemp("resave") / "ckpt", world_size=4, seed=1)
    return Path(demo_checkpoint.ckpt_dir), Path(other.ckpt_dir)


def data_files(ckpt: Path):
    return sorted(p.name for p in ckpt.iterdir() if p.name.endswith(".distcp"))


def resave_keeping_stat(ckpt: Path, new: Path) -> None:
    """The checkpoint re-saved in place, restored with `cp -p`: new weights, the old sizes and mtimes. Only the
    .distcp files are taken: the other save's `.metadata` names its own folder, and a save in place has the
    same `.metadata` (same layout, same folder)."""
    for name in data_files(ckpt):
        st = os.stat(ckpt / name)
        assert os.path.getsize(new / name) == st.st_size
        shutil.copyfile(new / name, ckpt / name)
        os.utime(ckpt / name, ns=(st.st_atime_ns, st.st_mtime_ns))


def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, copy_function=shutil.copy2)
    return dst


# -- 1. the record is written by every conversion -------------------------------------------------------------

@pytest.mark.parametrize("runner", ["threads", "shard-jobs"])
def test_every_conversion_writes_a_record_of_every_file(saves, tmp_path, runner):
    out = tmp_path / "out"
    kw = {} if runner == "threads" else {"shard_runner": runners.SeparateRunner()}
    report = streamconv.convert(str(saves[0]), str(out), max_shard_size=SHARD, dtype="bfloat16", **kw)
    found = record.read(str(out))
    assert found is not None and found.source_fingerprint.startswith(provenance.CONTENT_SCHEME)
    on_disk = sorted(p.name for p in out.iterdir() if p.name != record.RECORD_FILE)
    assert sorted(found.files) == on_disk and "config.json" in on_disk and len(report.files) >= 3
    for name, entry in found.files.items():
        data = (out / name).read_bytes()
        assert (entry.nbytes, entry.crc32) == (len(data), zlib.crc32(data)), name
    assert found.options["dtype"] == "bfloat16" and str(saves[0]) not in (out / record.RECORD_FILE).read_text()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


# -- 2. the fingerprint and --resume ---------------------------------------------------------------------------

def test_fingerprint_tells_two_saves_apart_and_copies_alike(saves, tmp_path):
    fps = []
    for ckpt in (saves[0], saves[1], copy_ckpt(saves[0], tmp_path / "copy")):
        reader, meta = api.load(str(ckpt))
        with reader:
            conversion = api.plan(str(ckpt), no_config=True)
            before = provenance.snapshot(str(ckpt), provenance.source_files(str(ckpt), meta))
            fps.append(provenance.source_fingerprint(str(ckpt), meta, api.locate_chunks(conversion, reader), before))
    assert fps[0] != fps[1] and fps[0] == fps[2]


def test_resume_refuses_a_resave_restored_with_sizes_and_mtimes_kept(saves, tmp_path):
    ckpt = copy_ckpt(saves[0], tmp_path / "ckpt")
    out = tmp_path / "out"
    args = ("convert", ckpt, out, "--max-shard-size", SHARD)
    assert run(*args, env={failpoints.KILL_AT_ENV: "between-shards"}).returncode == -9
    resave_keeping_stat(ckpt, saves[1])
    resumed = run(*args, "--resume")
    assert resumed.returncode == 73 and no_traceback(resumed), resumed.stderr
    assert "content changed" in resumed.stderr and "--discard-partial" in resumed.stderr
    assert not out.exists()


# -- 3. a checkpoint re-saved during the conversion ---------------------------------------------------------------

def test_checkpoint_rewritten_during_the_run_commits_nothing(saves, tmp_path, monkeypatch):
    ckpt = copy_ckpt(saves[0], tmp_path / "ckpt")
    out = tmp_path / "out"
    real = staging.StagingDir.write_json

    def trainer_saves_meanwhile(self, name, obj):
        resave_keeping_stat(ckpt, saves[1])     # even with sizes and mtimes kept (ctime changes)
        return real(self, name, obj)

    monkeypatch.setattr(staging.StagingDir, "write_json", trainer_saves_meanwhile)
    with pytest.raises(provenance.SourceChangedError) as caught:
        streamconv.convert(str(ckpt), str(out), max_shard_size=SHARD)
    assert caught.value.exit_code == 2 and "changed while it was converted" in str(caught.value)
    assert "trainer may still be writing" in str(caught.value)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_with_crc_a_chunk_changed_during_the_run_is_reported_as_changed_not_corrupt(saves, tmp_path, monkeypatch):
    ckpt = copy_ckpt(saves[0], tmp_path / "ckpt")
    real = shardjob.write_shards

    def trainer_saves_meanwhile(*args, **kwargs):
        resave_keeping_stat(ckpt, saves[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(shardjob, "write_shards", trainer_saves_meanwhile)
    with pytest.raises(CheckpointError) as caught:
        streamconv.convert(str(ckpt), str(tmp_path / "out"), max_shard_size=SHARD, crc=True)
    assert isinstance(caught.value, provenance.SourceChangedError), caught.value
    assert "corrupt" not in str(caught.value) and "good copy" not in str(caught.value)


# -- 4, 5. verify takes the record's options and checks its files -------------------------------------------------

@pytest.fixture(scope="module")
def made(saves, tmp_path_factory):
    """An output made with naming and dtype options verify would otherwise need."""
    out = tmp_path_factory.mktemp("made") / "out"
    streamconv.convert(str(saves[0]), str(out), max_shard_size=SHARD, dtype="float16",
                       exclude=("*.layers.1.*",), renames=(r"^model\.=base.",), allow_unmatched=True)
    return out


def test_verify_needs_no_options_and_says_what_it_checked(saves, made):
    result = run("verify", saves[0], made)
    assert result.returncode == 0 and no_traceback(result), result.stderr
    assert "options from streamconv.json" in result.stdout and "float16" in result.stdout
    assert "made from this checkpoint's content" in result.stdout and "config.json" in result.stdout


def test_verify_refuses_options_that_contradict_the_record(saves, made):
    result = run("verify", saves[0], made, "--dtype", "bfloat16")
    assert result.returncode == 64 and no_traceback(result)
    assert "bfloat16" in result.stderr and "float16" in result.stderr and "dtype" in result.stderr


def test_verify_help_lists_only_what_applies():
    result = run("verify", "--help")
    assert "--max-shard-size" not in result.stdout and "--overwrite" not in result.stdout


def test_verify_of_another_save_says_other_weights(saves, made):
    result = run("verify", saves[1], made)
    assert result.returncode == 3 and no_traceback(result)
    assert "made from other weights" in result.stderr


@pytest.mark.parametrize("damage", ["truncate", "delete", "edit"])
def test_verify_finds_a_damaged_sidecar(saves, made, tmp_path, damage):
    out = tmp_path / "out"
    shutil.copytree(made, out)
    config = out / "config.json"
    if damage == "truncate":
        config.write_bytes(config.read_bytes()[:10])
    elif damage == "delete":
        config.unlink()
    else:
        config.write_bytes(config.read_bytes().replace(b"float16", b"float32"))
    result = run("verify", saves[0], out)
    assert result.returncode == 3 and no_traceback(result)
    assert "config.json" in result.stderr


def test_verify_without_a_record_says_to_pass_the_options(saves, made, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(made, out)
    (out / record.RECORD_FILE).unlink()
    result = run("verify", saves[0], out, "--dtype", "float16", "--exclude", "*.layers.1.*", "--rename",
                 r"^model\.=base.", "--allow-unmatched")
    assert result.returncode == 0, result.stderr
    assert "pass the naming and dtype options" in result.stdout


# -- 6. batch skips only outputs of the same checkpoint -----------------------------------------------------------

def test_batch_skips_only_the_same_checkpoint(saves, tmp_path):
    ckpt = copy_ckpt(saves[0], tmp_path / "runs" / "checkpoint-last")
    args = ("batch", str(tmp_path / "runs" / "*"), "-o", str(tmp_path / "hf" / "{name}"),
            "--max-shard-size", SHARD, "--json", "-j", "1")
    first = run(*args)
    assert first.returncode == 0, first.stderr
    again = run(*args)
    assert json.loads(again.stdout)["checkpoints"][0]["status"] == "skipped", again.stdout
    resave_keeping_stat(ckpt, saves[1])     # checkpoint-last/ saved again in place
    other = run(*args)
    item = json.loads(other.stdout)["checkpoints"][0]
    assert other.returncode == 1 and item["status"] == "failed" and item["exit_code"] == 73, other.stdout
    assert "other weights" in item["error"] and "--overwrite" in item["error"]
    replaced = run(*args, "--overwrite")
    assert json.loads(replaced.stdout)["checkpoints"][0]["status"] == "converted", replaced.stdout
    assert run("verify", ckpt, tmp_path / "hf" / "checkpoint-last").returncode == 0


# -- 7. --overwrite replaces only streamconv outputs ----------------------------------------------------------------

def test_overwrite_refuses_a_base_model_folder_and_names_what_would_be_lost(saves, tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    (base / "model.safetensors").write_bytes(b"x" * 100)
    (base / ".git").mkdir()
    before = sorted(p.name for p in base.iterdir())
    refused = run("convert", saves[0], base, "--overwrite")
    assert refused.returncode == 73 and no_traceback(refused)
    assert "config.json" in refused.stderr and ".git" in refused.stderr and "--overwrite-any" in refused.stderr
    assert sorted(p.name for p in base.iterdir()) == before and (base / "config.json").read_text() == "{}"
    forced = run("convert", saves[0], base, "--overwrite-any", "--max-shard-size", SHARD)
    assert forced.returncode == 0, forced.stderr
    assert record.read(str(base)) is not None and not (base / ".git").exists()


def test_a_project_folder_never_gets_the_overwrite_suggestion(saves, tmp_path):
    project = tmp_path / "project"
    (project / ".git").mkdir(parents=True)
    (project / "notes.txt").write_text("mine")
    for extra in ((), ("--overwrite",)):
        result = run("convert", saves[0], project, *extra)
        assert result.returncode == 73 and no_traceback(result)
        assert "--overwrite" not in result.stderr and "no model files" in result.stderr
    assert (project / "notes.txt").read_text() == "mine"


def test_overwrite_replaces_a_streamconv_output_of_other_weights(saves, tmp_path):
    out = tmp_path / "out"
    assert run("convert", saves[0], out, "--max-shard-size", SHARD).returncode == 0
    other = run("convert", saves[1], out, "--max-shard-size", SHARD)
    assert other.returncode == 73 and "other weights" in other.stderr and "--overwrite" in other.stderr
    replaced = run("convert", saves[1], out, "--max-shard-size", SHARD, "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert run("verify", saves[1], out).returncode == 0


# -- 8. already converted ----------------------------------------------------------------------------------------

def test_a_retry_after_the_commit_is_already_converted(saves, tmp_path):
    out = tmp_path / "out"
    assert run("convert", saves[0], out, "--max-shard-size", SHARD).returncode == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = run("convert", saves[0], out, "--max-shard-size", SHARD, "--json")
    assert again.returncode == 0 and no_traceback(again), again.stderr
    report = json.loads(again.stdout)
    assert report["already_converted"] is True and report["bytes_written"] == 0
    assert any("already converted" in n for n in report["notes"])
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    text = run("convert", saves[0], out, "--max-shard-size", SHARD)
    assert text.returncode == 0 and "already converted" in text.stdout and "--overwrite to replace" not in text.stderr
    other_plan = run("convert", saves[0], out, "--max-shard-size", "5GB")
    assert other_plan.returncode == 73 and "other options" in other_plan.stderr


def test_a_damaged_output_of_the_same_checkpoint_is_not_already_converted(saves, tmp_path):
    out = tmp_path / "out"
    assert run("convert", saves[0], out, "--max-shard-size", SHARD).returncode == 0
    (out / "config.json").unlink()
    again = run("convert", saves[0], out, "--max-shard-size", SHARD)
    assert again.returncode == 73 and "config.json is missing" in again.stderr and "--overwrite" in again.stderr
    assert "other options" not in again.stderr
    fixed = run("convert", saves[0], out, "--max-shard-size", SHARD, "--overwrite")
    assert fixed.returncode == 0 and (out / "config.json").is_file()


def test_verify_finds_a_renamed_single_file_output(saves, tmp_path):
    out = tmp_path / "out"
    streamconv.convert(str(saves[0]), str(out))         # one file, no index
    os.rename(out / "model.safetensors", out / "weights.safetensors")
    result = run("verify", saves[0], out)
    assert result.returncode == 3 and no_traceback(result)
    assert "model.safetensors" in result.stderr and "missing" in result.stderr
