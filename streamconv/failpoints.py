"""Failpoints: the environment switches that let a test crash, stall or slow-path a real run from outside.

Never needed in normal use. This is the only module that reads them (tests/test_failpoints.py holds the
package to that), so a reader finds every way the environment can change a run's behaviour in one screen;
docs/failpoints.md explains how to use them to test crash consistency.

    STREAMCONV_TEST_KILL_AT=POINT[@N]        at the Nth pass (default 1) of kill point POINT, signal ourselves
    STREAMCONV_TEST_KILL_SIGNALS=KILL        which signals, comma separated ("INT,TERM,HUP", "STOP")
    STREAMCONV_NO_FAST_PATHS=1|all|NAMES     turn fast IO paths off (fastpaths.py parses the value)
    STREAMCONV_UNSAFE_NO_FSYNC=1             skip every fsync (benchmarks only: what durability costs)
    STREAMCONV_TEST_NO_PDEATHSIG=1           batch jobs skip prctl(PR_SET_PDEATHSIG) (batch_job.py)
    STREAMCONV_TEST_RAY_KILL_DIR=FOLDER      Ray tasks kill their own worker once per shard (ray_runner.py)
    STREAMCONV_TEST_STARTED_FD=FD            the command line writes a line to this inherited file descriptor once
                                             its interrupt handlers are in place (cli.py), before it imports the
                                             verbs: a test's cue to send a signal at a known moment of start-up

Two settings (not test switches) live here for the same reason, read by hf/meta_probe.py:
    STREAMCONV_META_TIMEOUT_S=SECONDS        how long transformers may take to say what a config's model loads
    STREAMCONV_META_CACHE_DIR=FOLDER         keep those answers there (by config content and transformers version)
"""
from __future__ import annotations

import os
import signal
from typing import Dict, Mapping, Optional

KILL_AT_ENV = "STREAMCONV_TEST_KILL_AT"
KILL_SIGNALS_ENV = "STREAMCONV_TEST_KILL_SIGNALS"
NO_FAST_PATHS_ENV = "STREAMCONV_NO_FAST_PATHS"
NO_FSYNC_ENV = "STREAMCONV_UNSAFE_NO_FSYNC"
NO_PDEATHSIG_ENV = "STREAMCONV_TEST_NO_PDEATHSIG"
RAY_KILL_DIR_ENV = "STREAMCONV_TEST_RAY_KILL_DIR"
STARTED_FD_ENV = "STREAMCONV_TEST_STARTED_FD"
META_TIMEOUT_ENV = "STREAMCONV_META_TIMEOUT_S"
META_CACHE_ENV = "STREAMCONV_META_CACHE_DIR"


def environment() -> Mapping[str, str]:
    """The whole process environment, for hf/meta_probe: its settings above, and what its child inherits."""
    return os.environ

# Every kill point, roughly in the order a run passes them, and where it fires. A name here that no code passes, or a
# `kill_point` call not named here, fails tests/test_failpoints.py; docs/failpoints.md lists the same names.
POINTS: Dict[str, str] = {
    "copy-probe": "fastpaths' copy_file_range probe file exists in the scratch folder (fastpaths.probe_copy)",
    "before-first-shard": "the staging folder exists, nothing of the output is written yet (conversion.write)",
    "mid-shard": "a shard file is partly written: after a tensor, while more remain (parallel.py)",
    "between-shards": "a shard is fsynced and its resume record written (ledger.Ledger.record)",
    "mid-upload": "a bucket output: a part of a shard's multipart upload is uploaded, more remain (upload.py)",
    "index": "half of model.safetensors.index.json is written (StagingDir.write_index)",
    "before-source-recheck": "every shard and the record are written; the source is checked unchanged next",
    "files-synced": "every output file is fsynced, the resume records are still there (StagingDir.commit)",
    "records-removed": "the resume records are removed; the staging folder is the output-to-be",
    "before-rename": "the staging folder is fsynced; the commit rename comes next",
    "journal-written": "--overwrite: the swap journal is durable, nothing has moved yet",
    "after-exchange": "--overwrite: renameat2(RENAME_EXCHANGE) swapped the old and new folders",
    "between-swap-renames": "--overwrite without EXCHANGE: the old folder is set aside, the new not yet in place",
    "promote": "a bucket output: the previous output's record and index are deleted, nothing copied yet "
               "(remote_staging.py)",
    "after-rename": "the output is in place; its parent folder is not yet fsynced",
    "parent-synced": "the parent folder is fsynced: the commit is durable",
    "old-removed": "--overwrite: the replaced output is deleted",
    "after-commit": "the commit is over and the run lock released",
}

_kill_counts: Dict[str, int] = {}


def kill_point(name: str) -> None:
    """When STREAMCONV_TEST_KILL_AT names this point (its Nth pass with `@N`), send ourselves the signals of
    STREAMCONV_TEST_KILL_SIGNALS (SIGKILL by default), one after another."""
    wanted = os.environ.get(KILL_AT_ENV)
    if not wanted:
        return
    point, _, nth = wanted.partition("@")
    if point != name:
        return
    _kill_counts[name] = _kill_counts.get(name, 0) + 1
    if _kill_counts[name] != int(nth or 1):
        return
    for sig in os.environ.get(KILL_SIGNALS_ENV, "KILL").split(","):
        os.kill(os.getpid(), getattr(signal, "SIG" + sig.strip().upper()))


def arm_kill(point: Optional[str]) -> None:
    """Set (a name) or clear (None) STREAMCONV_TEST_KILL_AT for this process from inside it: a Ray task that
    is to die half way through its shard arms `mid-shard` for itself (ray_runner.py)."""
    if point is None:
        os.environ.pop(KILL_AT_ENV, None)
    else:
        os.environ[KILL_AT_ENV] = point


def no_fast_paths(environ: Optional[Mapping[str, str]] = None) -> str:
    """The raw STREAMCONV_NO_FAST_PATHS value ("" when unset); `environ` lets a caller ask about another
    environment (fastpaths.detect's tests)."""
    return (os.environ if environ is None else environ).get(NO_FAST_PATHS_ENV, "")


def fsync_enabled() -> bool:
    return os.environ.get(NO_FSYNC_ENV) != "1"


def pdeathsig_enabled() -> bool:
    """False when the test asks batch jobs to rely on their stdin watch alone to notice a dead driver."""
    return os.environ.get(NO_PDEATHSIG_ENV) != "1"


def announce_start() -> None:
    """When STREAMCONV_TEST_STARTED_FD names a file descriptor (a pipe the test keeps reading), write one line
    to it: the command line's interrupt handlers are in place, nothing else of streamconv's is imported yet."""
    fd = os.environ.get(STARTED_FD_ENV)
    if fd:
        os.write(int(fd), b"started\n")


def ray_kill_dir() -> Optional[str]:
    return os.environ.get(RAY_KILL_DIR_ENV) or None
