"""`batch`'s inputs: which folders are sources (not last run's outputs), which outputs are one folder (by
identity, through symlinks and bind mounts), the README's command on the layout its glob implies, and a
`--from-file` that is not UTF-8. Real checkpoints (copies of the demo checkpoint)."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from streamconv.runs import batch

REPO = Path(__file__).resolve().parents[2]
SHARD = "100KB"


def run(*args, cwd, timeout=120):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "streamconv", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=timeout)


@pytest.fixture
def two_runs(demo_checkpoint, tmp_path):
    """runs/a/checkpoint-1 and runs/b/checkpoint-1: two training runs, each with a step 1."""
    for run_name in ("a", "b"):
        shutil.copytree(demo_checkpoint.ckpt_dir, tmp_path / "runs" / run_name / "checkpoint-1",
                        ignore=shutil.ignore_patterns("hf_config"))
    return tmp_path


def test_the_readme_batch_command_runs_on_two_runs_with_the_same_step(two_runs):
    """README's `streamconv batch 'runs/*/checkpoint-*' -o ...` line, as written, on the layout its glob implies."""
    line = next(l for l in (REPO / "README.md").read_text().splitlines()
                if l.startswith("streamconv batch 'runs/*/checkpoint-*' -o "))
    argv = shlex.split(line.split("#")[0])
    result = run(*argv[1:], cwd=two_runs)
    assert result.returncode == 0, result.stderr
    outputs = sorted(p.relative_to(two_runs / "hf") for p in (two_runs / "hf").glob("**/model*.safetensors*"))
    assert [str(p.parent) for p in outputs] == ["a/checkpoint-1", "b/checkpoint-1"], outputs


def test_a_collision_is_refused_with_a_template_that_works(two_runs):
    refused = run("batch", "runs/*/checkpoint-*", "-o", "hf/{name}", "--no-config", cwd=two_runs)
    assert refused.returncode == 64, refused.stderr
    suggested = re.search(r"use e.g. --output-template '([^']+)'", refused.stderr)
    assert suggested and "Traceback" not in refused.stderr, refused.stderr
    assert not (two_runs / "hf").exists()
    ok = run("batch", "runs/*/checkpoint-*", "-o", suggested.group(1), "--no-config", "--json", cwd=two_runs)
    assert ok.returncode == 0, ok.stderr
    assert [c["status"] for c in json.loads(ok.stdout)["checkpoints"]] == ["converted", "converted"]


def _nothing_written(hf: Path) -> None:
    left = sorted(str(p.relative_to(hf)) for p in hf.rglob("*") if not p.is_symlink() and p.is_file())
    assert left == [], left
    assert not [p for p in hf.iterdir() if "streamconv" in p.name]


def test_outputs_aliased_by_a_symlink_are_refused_before_anything_is_written(two_runs):
    hf = two_runs / "hf"
    hf.mkdir()
    (hf / "a").mkdir()
    (hf / "b").symlink_to("a")
    result = run("batch", "runs/*/checkpoint-1", "-o", "hf/{parent}", "--no-config", cwd=two_runs)
    assert result.returncode == 64, result.stderr
    assert "one folder" in result.stderr and "runs/a/checkpoint-1" in result.stderr, result.stderr
    _nothing_written(hf)
    # A symlink to a folder not made yet aliases too: both outputs would be created as hf/a/x.
    (hf / "b").unlink()
    (hf / "a").rmdir()
    (hf / "b").symlink_to("a")
    result = run("batch", "runs/*/checkpoint-1", "-o", "hf/{parent}/x", "--no-config", cwd=two_runs)
    assert result.returncode == 64 and "one folder" in result.stderr, result.stderr
    assert not (hf / "a").exists()


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="bind mounts need root and unshare (run in a private mount namespace)")
def test_outputs_aliased_by_a_bind_mount_are_refused_before_anything_is_written(two_runs):
    hf = two_runs / "hf"
    (hf / "a").mkdir(parents=True)
    (hf / "b").mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    script = (f"mount --bind {shlex.quote(str(hf / 'a'))} {shlex.quote(str(hf / 'b'))} && "
              f"{shlex.quote(sys.executable)} -m streamconv batch 'runs/*/checkpoint-1' -o 'hf/{{parent}}' --no-config")
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], cwd=two_runs,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 64, result.stderr
    assert "one folder" in result.stderr, result.stderr
    _nothing_written(hf)


def test_a_glob_that_matches_last_runs_outputs_leaves_them_out(two_runs):
    args = ["batch", "runs/a/*", "-o", "runs/a/{name}-hf", "--no-config", "--max-shard-size", SHARD, "--json"]
    first = run(*args, cwd=two_runs)
    assert first.returncode == 0, first.stderr
    again = run(*args, cwd=two_runs)
    assert again.returncode == 0, again.stderr
    report = json.loads(again.stdout)
    assert [(c["source"], c["status"]) for c in report["checkpoints"]] == [("runs/a/checkpoint-1", "skipped")]
    assert report["notes"] == ["left out runs/a/checkpoint-1-hf: it is a converted output, not a checkpoint"]
    text = run(*args[:-1], cwd=two_runs)
    assert text.returncode == 0 and "note: left out runs/a/checkpoint-1-hf" in text.stderr, text.stderr


def test_which_folders_are_outputs(two_runs, tmp_path):
    assert not batch.looks_like_output(str(two_runs / "runs/a/checkpoint-1"))
    record_only = tmp_path / "recorded"
    record_only.mkdir()
    (record_only / "streamconv.json").write_text("{}")
    assert batch.looks_like_output(str(record_only))
    per_rank = tmp_path / "per-rank"      # Hugging Face per-rank shards: a source
    per_rank.mkdir()
    (per_rank / "shard-00001-model-00001-of-00001.safetensors").write_bytes(b"")
    assert not batch.looks_like_output(str(per_rank))
    run_folder = tmp_path / "run"         # an exported model beside the DCP folder: still a run folder
    shutil.copytree(two_runs / "runs/a/checkpoint-1", run_folder / "pytorch_model_fsdp_0")
    (run_folder / "model.safetensors").write_bytes(b"")
    assert not batch.looks_like_output(str(run_folder))


def test_a_from_file_line_that_is_not_utf8_is_a_folder_name_not_a_crash(two_runs):
    """Lines are decoded as the shell decodes arguments (test_cli_manners covers a folder that exists): a
    folder that is not there fails its checkpoint by name; a file holding NUL bytes is not a list (64)."""
    listing = two_runs / "list.txt"
    listing.write_bytes(b"runs/a/checkpoint-1\nruns/\xe9t\xe9/checkpoint-1\n")
    result = run("batch", "--from-file", listing, "-o", "hf/{parent}", "--no-config", cwd=two_runs)
    assert result.returncode == 1, result.stderr
    assert "internal error" not in result.stderr and "checkpoint-1" in result.stderr, result.stderr
    assert (two_runs / "hf" / "a").is_dir()
    listing.write_bytes(b"runs/a/checkpoint-1\x00\n")
    result = run("batch", "--from-file", listing, "-o", "hf2/{parent}", "--no-config", cwd=two_runs)
    assert result.returncode == 64 and "not a list of folders" in result.stderr, result.stderr
    assert not (two_runs / "hf2").exists()


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_ray_address_nobody_listens_on_is_refused_in_seconds(two_runs):
    import time
    from streamconv.runs import ray_runner
    from streamconv.errors import OptionsError
    port = _free_port()
    started = time.monotonic()
    result = run("batch", "runs/*/checkpoint-1", "-o", "hf/{parent}", "--no-config", "--ray", f"127.0.0.1:{port}",
                 cwd=two_runs, timeout=90)
    assert result.returncode == 64, result.stderr
    assert time.monotonic() - started < 30
    assert f"--ray 127.0.0.1:{port}: no Ray cluster answers there" in result.stderr, result.stderr
    assert "ray start --head" in result.stderr and "Traceback" not in result.stderr
    assert not (two_runs / "hf").exists()
    with pytest.raises(OptionsError, match="no Ray cluster answers"):
        ray_runner.probe(f"ray://127.0.0.1:{port}")
    for bad in ("head", "head:port", "ray://:10001", "head:70000"):
        with pytest.raises(OptionsError, match="not an address"):
            ray_runner.probe(bad)
    ray_runner.probe("local")       # left to Ray: finds or starts a cluster on this machine
