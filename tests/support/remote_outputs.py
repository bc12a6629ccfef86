"""Comparing a conversion that read from or wrote into object storage with the local conversion of the same
checkpoint, file for file (the gs:// tests; `streamconv` run as a user runs it)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Dict


def run(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamconv", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)


def held_its_prediction(result) -> None:
    """A `convert --json` from a bucket peaked at most at the peak it predicted (the client stack counted)."""
    report = json.loads(result.stdout)
    assert report["peak_rss_bytes"] <= report["predicted_peak_bytes"], (
        report["peak_rss_bytes"] / 2**20, report["predicted_peak_bytes"] / 2**20)


def files_of(folder: Path) -> Dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def same_output(mine: Dict[str, bytes], theirs: Dict[str, bytes]) -> None:
    """Every file equal byte for byte, except in the record the `checkpoint` line (a URL on one side, a path on
    the other) and a stat fingerprint (no CRC-32s recorded: tied to files' mtimes locally, to objects' versions in
    a bucket). A content fingerprint (CRC-32s) is the same wherever the checkpoint is stored."""
    assert sorted(mine) == sorted(theirs)
    for name in mine:
        if name == "streamconv.json":
            a, b = json.loads(mine[name]), json.loads(theirs[name])
            for record in (a, b):
                record.pop("checkpoint", None)
                if record["source"]["fingerprint"].startswith("stat1-"):
                    record["source"].pop("fingerprint")
            assert a == b
        else:
            assert mine[name] == theirs[name], name


def only_a_staging_prefix_left(left: Dict[str, bytes]) -> None:
    """What a run killed before publishing leaves at an output prefix (`left`: {name: bytes}): no record, only
    its staging prefix and its lock naming it (output/remote_lock.py): obviously partial."""
    assert left and all(n.startswith(".streamconv-staging-") for n in left if n != ".streamconv-lock")
    staged = {n.split("/")[0] for n in left if n != ".streamconv-lock"}
    assert [json.loads(left[".streamconv-lock"])["staging"]] == sorted(staged)


def unfinished_refused_then_resumed(ckpt, url: str, args, env, kept: str) -> None:
    """After a killed run: `verify` calls the prefix unfinished (exit 3), a plain run is refused (exit 73, naming
    --resume), and `--resume` finishes it, keeping what `kept` says ("kept 2 of")."""
    unfinished = run("verify", ckpt, url, env=env)
    assert unfinished.returncode == 3 and "not a finished output" in unfinished.stderr, unfinished.stderr
    refused = run("convert", ckpt, url, *args, env=env)
    assert refused.returncode == 73 and "--resume" in refused.stderr, refused.stderr
    resumed = run("convert", ckpt, url, *args, "--resume", env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert kept in resumed.stdout, resumed.stdout


def same_inspect_and_plan(folder, url: str, env) -> None:
    """`inspect --json` and `plan --json` of a checkpoint in a bucket say what they say of its local copy."""
    local, remote = run("inspect", folder, "--json", env=env), run("inspect", url, "--json", env=env)
    assert remote.returncode == 0, remote.stderr
    a, b = json.loads(local.stdout), json.loads(remote.stdout)
    assert b.pop("checkpoint") == url and a.pop("checkpoint") == str(folder)
    assert a == b
    planned = run("plan", url, "--no-config", "--json", env=env)
    assert planned.returncode == 0, planned.stderr
    assert json.loads(planned.stdout)["tensors"] == json.loads(run("plan", folder, "--no-config", "--json",
                                                                   env=env).stdout)["tensors"]


def failed_as_changed(result, changed_url: str, out: Path) -> None:
    """A run whose source object was re-uploaded while it read: exit 2 naming the object, nothing committed."""
    assert result.returncode == 2, result.stderr
    assert "changed while it was converted" in result.stderr and changed_url in result.stderr
    assert not Path(out).exists()
