"""Scale-out on Ray (`pip install 'streamconv[ray]'`): each checkpoint's shards are written by Ray tasks.

The driver keeps what must happen once: it plans (from `.metadata`), owns the staging folder and its lock,
and after every task succeeded checks each shard's record and size in the ledger, checks tied heads, copies the
config, writes the index and commits in one rename (`runs/conversion.py`, with `RayRunner` as its runner).
Each task writes one shard job with `shardjob.write_job_alone`, idempotently, into the staging folder, which
every worker must see at the same path (a shared filesystem). A task declares the plan's predicted peak as its
`memory=` resource, so Ray does not start more of them on a node than its memory holds; a task whose worker
dies (OOM killer, lost node) is run again by Ray (`max_retries`) and rewrites its shard from the start. Errors in the data (a corrupt chunk)
are not retried: they fail the checkpoint as they would locally.
"""
from __future__ import annotations

import os
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Sequence

from .. import failpoints
from .batch_job import convert_one
from ..errors import OptionsError, OutputError, StreamconvError
from .report import Reporter
from .shardjob import JobContext, ShardJob, Written, write_job_alone

# A lost worker is retried this many times per shard before the checkpoint fails.
MAX_RETRIES = 3

# Seconds to wait for a TCP connection to the head node before refusing the address.
PROBE_TIMEOUT_S = 5.0
RAY_CLIENT_PORT = 10001     # ray://HOST without a port: Ray client's default

_remote = None


def _import_ray():
    try:
        import ray
    except ImportError:
        raise OptionsError("--ray needs Ray: pip install 'streamconv[ray]'") from None
    return ray


def probe(address: Optional[str], timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Refuse, in seconds, an address nobody listens on: `ray.init` would retry it for many minutes (822 s
    measured) while printing Ray's warnings. Only a TCP connect to the address's port; "local", "auto" and
    None are left to Ray (they find or start a cluster on this machine)."""
    if address in (None, "", "local", "auto"):
        return
    rest = address[len("ray://"):] if address.startswith("ray://") else address
    host, sep, port_text = rest.rpartition(":")
    if not sep and address.startswith("ray://"):
        host, port_text = rest, str(RAY_CLIENT_PORT)
    host = host.strip("[]")     # [::1]:6379
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise OptionsError(f"--ray {address}: not an address; give HOST:PORT of the head node (e.g. head:6379, "
                           f"the port of `ray start --head --port=6379`) or ray://HOST:10001")
    try:
        with socket.create_connection((host, int(port_text)), timeout=timeout_s):
            pass
    except OSError as exc:
        why = "timed out" if isinstance(exc, socket.timeout) else (exc.strerror or str(exc))
        raise OptionsError(
            f"--ray {address}: no Ray cluster answers there ({why} after at most {timeout_s:.0f} s). Start one "
            f"with `ray start --head --port={port_text}` on the head node, check the address (`ray status` on "
            "the head prints it), or pass --ray alone for a local cluster") from None


def connect(address: Optional[str] = None) -> None:
    """Join the Ray cluster at `address`, or start a local one ("local" or None). Reuses a connection made
    by the caller (`ray.init(...)` before `convert_many(..., ray="local")`)."""
    ray = _import_ray()
    if ray.is_initialized():
        return
    probe(address)
    try:
        if address in (None, "", "local"):
            ray.init(include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise OptionsError(f"--ray {address}: cannot connect to a Ray cluster: {exc}") from None


def _task(context: JobContext, filename: str) -> Written:
    # Test hook (STREAMCONV_TEST_RAY_KILL_DIR, failpoints.py): a task finding `kill-<shard file name>` in that
    # folder removes the file and SIGKILLs its own worker half-way through the shard, after writing its pid to
    # `killed-<name>` (the retry finds no file and finishes).
    kill_dir = failpoints.ray_kill_dir()
    if kill_dir:
        try:
            os.unlink(os.path.join(kill_dir, "kill-" + filename))
            with open(os.path.join(kill_dir, "killed-" + filename), "w") as f:
                f.write(str(os.getpid()))       # the test checks this process is gone
            failpoints.arm_kill("mid-shard")
        except FileNotFoundError:
            failpoints.arm_kill(None)
    return write_job_alone(ShardJob(context, filename))


class RayRunner:
    """A runner (runners.py): one Ray task per shard job, all waited for; the first failure is raised.
    `progress(tensor bytes)` as each shard finishes."""

    def run(self, jobs: Sequence[ShardJob], progress=None) -> List[Written]:
        global _remote
        if not jobs:
            return []
        ray = _import_ray()
        if _remote is None:
            _remote = ray.remote(_task)
        context = jobs[0].context
        context_ref = ray.put(context)      # the plan travels once to the object store, not once per task
        # At least 1 byte, so that a zero prediction still reserves something.
        refs = [_remote.options(memory=max(1, job.peak_bytes), num_cpus=1, max_retries=MAX_RETRIES,
                                retry_exceptions=False, name=f"streamconv:{job.filename}").remote(context_ref,
                                                                                                  job.filename)
                for job in jobs]
        job_of = dict(zip(refs, jobs))
        try:
            return self._wait(ray, refs, job_of, progress)
        except ray.exceptions.RayTaskError as exc:
            self._cancel(ray, refs)
            cause = exc.cause
            if isinstance(cause, StreamconvError):
                raise cause from None
            raise OutputError(f"{context.staging_dir}: a Ray task failed: {type(cause).__name__}: {cause}") from None
        except (ray.exceptions.WorkerCrashedError, ray.exceptions.RayError) as exc:
            self._cancel(ray, refs)
            raise OutputError(f"{context.staging_dir}: a Ray task failed after {MAX_RETRIES} retries: "
                              f"{type(exc).__name__}: {str(exc)[:300]}") from None

    @staticmethod
    def _wait(ray, refs, job_of, progress) -> List[Written]:
        results, waiting = [], list(refs)
        while waiting:
            done, waiting = ray.wait(waiting, num_returns=1)
            results.append(ray.get(done[0]))    # raises the task's error
            if progress is not None:
                progress(job_of[done[0]].shard.data_nbytes)
        return results

    @staticmethod
    def _cancel(ray, refs) -> None:
        for ref in refs:
            ray.cancel(ref, force=False)


def run_batch(todo, options, kwargs: dict, *, address: Optional[str], jobs: int, reporter, finish) -> None:
    """`batch.convert_many` on Ray: `jobs` checkpoints planned and committed side by side by this driver,
    each split into shard tasks; `finish(item, result, reporter)` as each checkpoint ends."""
    connect(address)

    class _Progress(Reporter):      # the batch's one display: bytes as shards finish, from any driver thread
        def advance(self, n_bytes: int) -> None:
            with lock:
                reporter.advance(n_bytes)

    lock = threading.Lock()

    def one(item):
        return item, convert_one(item.source, item.output, options, shard_runner=RayRunner(),
                                 reporter=_Progress(), **{**kwargs, "workers": item.workers})

    with ThreadPoolExecutor(max_workers=max(1, jobs), thread_name_prefix="streamconv-ray") as pool:
        for item, result in pool.map(one, todo):
            finish(item, result, reporter)
