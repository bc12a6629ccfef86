"""What the data-safety suites share (tests/end_to_end/test_safety.py, tests/output/test_staging.py and
test_destination.py): a private copy of a real tensor-parallel checkpoint with the snapshot every test checks it
against (the `source` fixture in tests/conftest.py), and the CLI run as a user runs it: in a process of its own when
the process is under test (killed, signalled, limited), else in this one (`run`).
"""
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import streamconv
from tests.support import dcp_writers

SHARD = "100KB"     # the tp checkpoint (~0.8 MB of weights) gives several shards and an index
REPO = Path(__file__).resolve().parents[2]


def snapshot(folder: Path) -> dict:
    """{relative path: (sha256, mtime_ns, size)} of every file under folder."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(folder))] = (hashlib.sha256(p.read_bytes()).hexdigest(), st.st_mtime_ns, st.st_size)
    return out


def tree_bytes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def write_source(root: Path, tp_checkpoint: Optional[Path] = None) -> dict:
    """A private copy of a real tensor-parallel checkpoint (so its mtimes are ours to check), its snapshot,
    and the output of one uninterrupted run. `tp_checkpoint`: the session's `dcp_checkpoints["tp"]` to copy
    (written here by torch when not given)."""
    ckpt = root / "ckpt"
    if tp_checkpoint is None:
        tp_checkpoint = dcp_writers.build(root / "written", names=["tp"])["tp"]
    shutil.copytree(tp_checkpoint, ckpt)
    ref = root / "reference"
    streamconv.convert(str(ckpt), str(ref), max_shard_size=SHARD)
    expected = tree_bytes(ref)
    assert len([n for n in expected if n.endswith(".safetensors")]) >= 4 and "model.safetensors.index.json" in expected
    return {"ckpt": ckpt, "snapshot": snapshot(ckpt), "expected": expected}


def check_untouched(source: dict) -> None:
    """Every source file has its bytes and mtime."""
    assert snapshot(source["ckpt"]) == source["snapshot"], "the source checkpoint changed"


def run(*args, env=None, preexec_fn=None, timeout=120) -> subprocess.CompletedProcess:
    """`streamconv *args` as a CompletedProcess. A run whose process is itself under test (a test switch such as
    a kill point or signals in `env`, or limits set by `preexec_fn`) gets a process of its own; any other run goes
    through the same click group in this process (`run_here`)."""
    if preexec_fn is None and not any(k.startswith(TEST_SWITCH_PREFIX) for k in env or {}):
        return run_here(*args, env=env)
    return run_apart(*args, env=env, preexec_fn=preexec_fn, timeout=timeout)


# The failpoints' test switches (STREAMCONV_TEST_KILL_AT, ..._KILL_SIGNALS, ...; streamconv/failpoints.py).
TEST_SWITCH_PREFIX = "STREAMCONV_TEST_"


def run_here(*args, env=None) -> subprocess.CompletedProcess:
    """The command through click's CliRunner in this process, `env` set for its duration: the exit code and the
    stdout and stderr that the command line's one error-to-exit-code place gives, as in a process of its own,
    without an interpreter's start-up and imports (~0.4 s of CPU a run; these suites make a few hundred runs). An exception
    that escapes the CLI is raised here: in a process it would be a traceback, which every test refuses."""
    from click.testing import CliRunner

    from streamconv.cli import cli

    argv = [str(a) for a in args]
    result = CliRunner().invoke(cli, argv, env=env, catch_exceptions=False)
    return subprocess.CompletedProcess(["streamconv", *argv], result.exit_code, result.stdout, result.stderr)


def run_apart(*args, env=None, preexec_fn=None, timeout=120) -> subprocess.CompletedProcess:
    """`python -m streamconv.cli *args` in a process of its own, as a user runs it."""
    full_env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "streamconv.cli", *map(str, args)], capture_output=True, text=True,
                          env=full_env, preexec_fn=preexec_fn, timeout=timeout)


def convert(src, out, *extra, **kw):
    return run("convert", src["ckpt"], out, "--max-shard-size", SHARD, *extra, **kw)


def no_traceback(result):
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, result.stderr
    return True


def hidden(folder: Path):
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith("." + folder.name))
